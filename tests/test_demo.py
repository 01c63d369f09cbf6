"""The main job and the command line."""

import pytest

from keras_split.apps import cli
from keras_split.apps.demo import run_demo


def test_demo_split_matches_unsplit_and_counts_bytes(capsys):
    lines = []
    result = run_demo(epochs=1, verbose=2, print_fn=lines.append)
    # Same initial weights and batch order: the accuracies agree closely.
    assert abs(result.split_accuracy - result.unsplit_accuracy) <= 0.02
    assert result.split_accuracy > 0.6  # better than chance on balanced classes
    # Cut pool2 is 5x5x32 float32 = 3,200 bytes, plus an int64 label going up.
    assert result.bytes_up_per_sample == 3208
    assert result.bytes_down_per_sample == 3200
    text = "\n".join(lines)
    assert "split test accuracy" in text and "unsplit test accuracy" in text
    # Under the progress bar, the counters as integers: 2,428 training samples x
    # 3,208 bytes up and 3,200 down, 270 validation samples x 3,208 up (no gradient
    # comes back from an evaluation). Never 7769600.0000 or 0.0000e+00.
    bar = capsys.readouterr().out
    assert "  bytes up 7,789,024, down 7,769,600; validation up 866,160, down 0\n" in bar
    assert "bytes_" not in bar


def test_cli_lists_cuts(capsys):
    assert cli.main(["demo", "--list-cuts"]) == 0
    out = capsys.readouterr().out
    assert "pool2" in out and "3,200" in out


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["demo", "--cut", "nope"]) == 2
    assert "No such layer: 'nope'" in capsys.readouterr().err
    assert cli.main(["demo", "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err


def test_cli_help_explains_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    for option in ("--epochs", "--cut", "--batch-size", "--list-cuts"):
        assert option in out
