"""The README's quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs(capsys):
    text = README.read_text()
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(block, "README quickstart", "exec"), namespace)  # noqa: S102
    history = namespace["history"].history
    assert len(history["bytes_up"]) == 5 and "val_accuracy" in history
    # 2,428 images, the last 10% held out: floor(2428 * 0.9) = 2,185 train samples
    # x (3,200 activation + 8 label) bytes.
    assert history["bytes_up"][0] == 2185 * 3208


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert "keras-split demo" in block[0]
    assert "pytest" in block[1]
