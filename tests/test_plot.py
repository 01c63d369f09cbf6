"""keras_split.plot: each figure rendered (Agg) to a file, and its content read back
from the axes: the lines' data, the bars' heights, the labels."""

import dataclasses

import matplotlib

matplotlib.use("Agg")

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_split  # noqa: E402
from keras_split import plot  # noqa: E402


@dataclasses.dataclass
class Row:
    """A row of the cut table, with the fields `cut_candidates` rows carry (the plot
    reads the absolute FLOPs and `layers` where rows have them)."""

    layer: str
    bytes_per_sample: int | None
    client_params: int
    client_flops_fraction: float
    client_flops: int = 0
    total_flops: int = 0
    layers: tuple = ()
    refused: str | None = None


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _render(figure, tmp_path, name="figure.png"):
    path = tmp_path / name
    figure.savefig(path)
    assert path.stat().st_size > 1000
    return figure


def _lines(axis):
    return {line.get_label(): np.asarray(line.get_ydata(), float).tolist()
            for line in axis.get_lines()}


def _bars(axis):
    return [patch.get_height() for patch in axis.patches]


def _ticks(axis):
    return [tick.get_text() for tick in axis.get_xticklabels()]


def test_history_split_beside_unsplit(tmp_path):
    split = keras.callbacks.History()
    split.history = {"loss": [0.9, 0.5], "accuracy": [0.6, 0.8], "val_loss": [0.7, 0.6],
                     "val_accuracy": [0.7, 0.75], "bytes_up": [10, 10], "bytes_down": [9, 9]}
    unsplit = {"loss": [0.8, 0.4], "accuracy": [0.65, 0.85]}
    figure = _render(plot.plot_history({"split": split, "unsplit": unsplit}, title="t"),
                     tmp_path)
    loss, accuracy = figure.axes  # bytes_* are left out
    assert loss.get_title() == "loss" and accuracy.get_title() == "accuracy"
    assert _lines(loss) == {"split": [0.9, 0.5], "split (val)": [0.7, 0.6],
                            "unsplit": [0.8, 0.4]}
    assert _lines(accuracy)["unsplit"] == [0.65, 0.85]
    assert loss.get_lines()[0].get_xdata().tolist() == [1, 2]  # epochs from 1
    assert loss.get_lines()[1].get_linestyle() == "--"  # validation dashed
    assert loss.get_lines()[0].get_color() == loss.get_lines()[1].get_color()
    (only,) = plot.plot_history({"split": split}, metrics=["bytes_up"]).axes
    assert _lines(only) == {"split": [10, 10]}
    with pytest.raises(ValueError, match=r"`histories` is empty"):
        plot.plot_history({})
    with pytest.raises(TypeError, match=r"Expected a keras History"):
        plot.plot_history({"x": [1, 2]})


def test_cut_table_with_absolute_flops(tmp_path):
    rows = [Row("conv1", 4096, 80, 0.25, client_flops=2_000_000, total_flops=8_000_000),
            Row("pool1", 1024, 80, 0.30, client_flops=2_400_000, total_flops=8_000_000),
            Row("flatten", None, 900, 0.90, client_flops=7_200_000,
                         total_flops=8_000_000)]
    figure = _render(plot.plot_cut_table(rows, highlight="pool1"), tmp_path)
    left, right = figure.axes
    assert _ticks(left) == ["conv1", "pool1", "flatten"]
    heights = _bars(left)
    assert left.get_ylabel() == "kB sent per sample"
    assert heights[:2] == [4.096, 1.024] and np.isnan(heights[2])  # unknown size: no bar
    assert right.get_ylabel() == "client forward MFLOPs per sample"
    np.testing.assert_allclose(_bars(right), [2.0, 2.4, 7.2])
    colours = [patch.get_facecolor() for patch in left.patches]
    assert colours[1] != colours[0] == colours[2]  # the chosen cut stands out


def test_cut_table_rows_that_stand_for_several_cuts(tmp_path):
    rows = [Row("conv", 400, 10, 0.5, layers=("conv", "relu")),
            Row("flatten", 100, 10, 0.6, layers=("pool", "flatten"))]
    figure = _render(plot.plot_cut_table(rows, highlight="pool"), tmp_path)
    assert _ticks(figure.axes[0]) == ["conv…relu", "pool…flatten"]
    colours = [patch.get_facecolor() for patch in figure.axes[0].patches]
    assert colours[0] != colours[1]


def test_cut_table_degrades_to_the_flops_share(tmp_path):
    class Old:  # rows without the absolute FLOPs fields
        def __init__(self, layer, size, fraction):
            self.layer, self.bytes_per_sample, self.client_flops_fraction = layer, size, fraction

    figure = _render(plot.plot_cut_table([Old("a", 10, 0.1), Old("b", 5, 0.5)]), tmp_path)
    assert figure.axes[1].get_ylabel() == "client share of forward FLOPs (%)"
    np.testing.assert_allclose(_bars(figure.axes[1]), [10.0, 50.0])
    assert figure.axes[0].get_ylabel() == "B sent per sample"
    rows = [Row("a", 10, 0, 0.1, refused="raw inputs"), Row("b", 5, 0, 0.5)]
    colours = [p.get_facecolor() for p in plot.plot_cut_table(rows).axes[0].patches]
    assert colours[0] != colours[1]  # a refused cut is grey
    with pytest.raises(ValueError, match=r"No cut candidates"):
        plot.plot_cut_table([])


def test_cut_table_of_a_real_model(tmp_path):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    rows = keras_split.cut_candidates(model)
    figure = _render(plot.plot_cut_table(rows), tmp_path)
    assert _ticks(figure.axes[0])[-1].endswith("flat")
    assert len(_ticks(figure.axes[0])) == len(rows)
    np.testing.assert_allclose(_bars(figure.axes[0]), [row.bytes_per_sample for row in rows])


def test_rounds_against_centralized(tmp_path):
    figure = _render(plot.plot_rounds({"round-robin": [0.6, 0.7, 0.8], "SplitFed": [0.5, 0.75]},
                                      centralized=[0.7, 0.8, 0.85]), tmp_path)
    (axis,) = figure.axes
    assert _lines(axis) == {"round-robin": [0.6, 0.7, 0.8], "SplitFed": [0.5, 0.75],
                            "centralized (per epoch)": [0.7, 0.8, 0.85]}
    assert axis.get_xlabel() == "round" and axis.get_ylabel() == "accuracy"
    (axis,) = plot.plot_rounds({"a": [0.1]}, centralized={"one model": 0.9}).axes
    assert _lines(axis)["one model (0.900)"] == [0.9, 0.9]  # a horizontal line


def test_bytes_per_party(tmp_path):
    history = keras.callbacks.History()
    history.history = {"bytes_up": [1_000_000, 1_000_000], "bytes_down": [500_000, 500_000]}
    figure = _render(plot.plot_bytes({"hospital A": (3_000_000, 1_500_000),
                                      "hospital B": history}), tmp_path)
    (axis,) = figure.axes
    assert axis.get_ylabel() == "MB"
    assert _bars(axis) == [3.0, 2.0, 1.5, 1.0]  # up A, up B, down A, down B
    assert _ticks(axis) == ["hospital A", "hospital B"]
    with pytest.raises(TypeError, match=r"Expected \(bytes_up, bytes_down\)"):
        plot.plot_bytes({"x": "y"})


def test_shards_show_the_class_mix(tmp_path):
    shards = keras_split.sharding.shard_dirichlet(np.zeros((300, 1)), np.repeat([0, 1, 2], 100),
                                                  3, alpha=0.3, seed=0)
    figure = _render(plot.plot_shards(shards, labels=["a", "b", "c"]), tmp_path)
    (axis,) = figure.axes
    heights = np.array(_bars(axis)).reshape(3, 3)  # class by client
    want = np.array([[np.sum(y == c) for _, y in shards] for c in range(3)])
    np.testing.assert_array_equal(heights, want)
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["a", "b", "c"]


def test_tradeoff_and_label_leakage(tmp_path):
    curves = {"NoPeek (alpha)": [(0, 0.7, 0.86), (1, 0.4, 0.84)],
              "noise (sigma)": [(0.1, 0.6, 0.85)]}
    figure = _render(plot.plot_tradeoff(curves, xlabel="dCor", baseline=0.1), tmp_path)
    (axis,) = figure.axes
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert lines["NoPeek (alpha)"].get_xdata().tolist() == [0.7, 0.4]
    assert lines["NoPeek (alpha)"].get_ydata().tolist() == [0.86, 0.84]
    assert [t.get_text() for t in axis.texts] == ["0", "1", "0.1"]
    assert list(lines["baseline"].get_xdata()) == [0.1, 0.1]
    with pytest.raises(ValueError, match=r"must be \(setting, leakage, accuracy\)"):
        plot.plot_tradeoff({"x": [(1, 2)]})

    from keras_split.privacy.attacks import LabelLeakageResult

    result = LabelLeakageResult(0.9, 0.8, np.array([0.9]), np.array([0.8]))
    figure = _render(plot.plot_label_leakage({"none": result, "max-norm": (0.55, 0.6)}),
                     tmp_path, "leak.png")
    (axis,) = figure.axes
    np.testing.assert_allclose(_bars(axis), [0.9, 0.55, 0.8, 0.6])
    assert _lines(axis)["chance"] == [0.5, 0.5]


def test_bars(tmp_path):
    figure = _render(plot.plot_bars({"client.tflite": 120_000, "client.onnx": 80_000},
                                    "bytes", log=True), tmp_path)
    (axis,) = figure.axes
    assert _bars(axis) == [120_000, 80_000] and axis.get_yscale() == "log"
    assert [t.get_text() for t in axis.texts] == ["1.2e+05", "8e+04"]


def test_without_matplotlib_the_error_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"Plots requires matplotlib. Install it with pip "
                                          r"install 'keras-split\[plot\]'"):
        plot.plot_bars({"a": 1}, "x")
