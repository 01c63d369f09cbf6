"""The configuration examples run and print their comparison (the fast ones in
CI, all of them with -m slow)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name, *args):
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args],
                            capture_output=True, text=True, timeout=600, cwd=EXAMPLES)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_vertical_breast_cancer_reaches_the_unsplit_accuracy():
    out = _run("vertical_breast_cancer", "--epochs", "10")
    split, unsplit = (float(v) for v in
                      out.split("test accuracy ")[1].replace(", unsplit", "").split())
    assert abs(split - unsplit) <= 0.01 and split > 0.9


def test_u_shaped_example_runs():
    assert "U-shaped test accuracy" in _run("u_shaped", "--epochs", "1")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "args"), [
    ("multihop", ["--epochs", "1"]), ("round_robin", ["--rounds", "1"]),
    ("splitfed", ["--rounds", "1"]), ("splitfed", ["--rounds", "1", "--version", "2",
                                                   "--alpha", "0.5"]),
    ("multitask", ["--epochs", "1"]), ("vertical_image_tabular", ["--epochs", "1"]),
])
def test_every_example_runs(name, args):
    assert "accuracy" in _run(name, *args)
