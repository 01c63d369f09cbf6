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
    # The shipped training split is sorted by class, so its last 10% would be one
    # class: the quickstart validates on the shipped validation split, both classes.
    assert "validation_data=(x_val, y_val)" in block
    assert set(namespace["y_val"].tolist()) == {0, 1}
    # All 2,428 training images x (3,200 activation + 8 label) bytes.
    assert history["bytes_up"][0] == 2428 * 3208
    assert f"{2428 * 3208:,} bytes up per epoch" in capsys.readouterr().out


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert "keras-split demo" in block[0]
    assert "pytest" in block[1]
