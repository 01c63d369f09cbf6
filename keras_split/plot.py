"""Figures for split learning: training curves, the cut table, rounds, bytes, leakage.

Each function takes plain results (a `History`, `cut_candidates` rows, lists
of numbers per round) and returns a matplotlib `Figure`, drawn with pyplot so
that a notebook shows it (assign it, `figure = plot_history(...)`, to show it
once) and a script can `figure.savefig("curves.png")`. matplotlib is the
optional `plot` extra: `pip install "keras-split[plot]"`.

The privacy attacks draw their own figures (`model_inversion(...).plot()`,
`label_leakage(...).plot()`); this module adds the comparisons across runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from keras_split_wire.optional import require

__all__ = [
    "plot_bars",
    "plot_bytes",
    "plot_cut_table",
    "plot_history",
    "plot_label_leakage",
    "plot_rounds",
    "plot_shards",
    "plot_tradeoff",
]


def _pyplot():
    return require("matplotlib.pyplot", "Plots", "keras-split[plot]")


def _logs(history) -> Mapping[str, Sequence[float]]:
    """`History.history`, a dict of lists, or an `EdgeClient.fit` result."""
    logs = getattr(history, "history", history)
    if not isinstance(logs, Mapping):
        raise TypeError(f"Expected a keras History or a dict of per-epoch lists, received "
                        f"{type(history).__name__}.")
    return logs


def _scale(values, unit: str = "B") -> tuple[float, str]:
    """A divisor and a unit label so the largest value reads between 1 and 1000."""
    largest = max((abs(v) for v in values if v is not None and np.isfinite(v)), default=0)
    for power, prefix in ((4, "T"), (3, "G"), (2, "M"), (1, "k")):
        if largest >= 1000 ** power:
            return 1000.0 ** power, f"{prefix}{unit}"
    return 1.0, unit


def plot_history(histories, metrics: Sequence[str] | None = None, title: str | None = None):
    """Training curves of several runs side by side: one panel per metric.

    Training values are solid lines, validation values (`val_*`) dashed, in
    the run's colour; the byte counters are left out unless asked for.

    Args:
        histories: `{label: History}` (or `History.history` dicts, or `EdgeClient.fit`
            results), e.g. `{"split": split_history, "unsplit": keras_history}`.
        metrics: the metrics to draw (default: every metric the runs log,
            without `bytes_*`, loss first).
        title: the figure's title.

    Returns:
        The matplotlib `Figure`.

    Example:

    ```python
    figure = keras_split.plot.plot_history({"split": history, "unsplit": reference})
    figure.savefig("curves.png")
    ```
    """
    if not histories:
        raise ValueError("`histories` is empty; pass {label: History} for at least one run.")
    runs = {label: _logs(history) for label, history in histories.items()}
    if metrics is None:
        found: list[str] = []
        for logs in runs.values():
            for key in logs:
                name = key[4:] if key.startswith("val_") else key
                if not name.startswith("bytes_") and name not in found:
                    found.append(name)
        metrics = sorted(found, key=lambda name: (name != "loss", found.index(name)))
    if not metrics:
        raise ValueError("The histories log no metric to draw.")
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4),
                                squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v"
    for axis, metric in zip(axes[0], metrics, strict=True):
        for index, (label, logs) in enumerate(runs.items()):
            # Runs that compute the same thing (split and unsplit) lie on top of
            # each other: hollow, larger markers keep the one underneath visible.
            style = dict(color=colours[index % len(colours)], marker=markers[index % 5],
                         markersize=4 + 3 * index, fillstyle="full" if index == 0 else "none")
            for key, line, suffix in ((metric, "-", ""), (f"val_{metric}", "--", " (val)")):
                if key in logs and len(logs[key]):
                    values = np.asarray(logs[key], dtype=float)
                    axis.plot(np.arange(1, len(values) + 1), values, line, **style,
                              label=f"{label}{suffix}")
        axis.set(xlabel="epoch", ylabel=metric, title=metric)
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_cut_table(rows, highlight: str | None = None, title: str | None = None):
    """Where to cut: bytes sent per sample, and the client's FLOPs, at each candidate cut.

    Two bar charts over the cuts of `keras_split.cut_candidates(model)`, in
    graph order: bytes the client sends per sample (left), and the forward
    FLOPs per sample the client computes (right; the client's share of the
    model's FLOPs when the rows carry no absolute count). Cuts that `split()`
    refuses (listed with `include_raw=True`) are grey.

    Args:
        rows: `cut_candidates(model)` (any objects with `layer`,
            `bytes_per_sample`, and `client_flops` or `client_flops_fraction`).
        highlight: a cut's layer name to mark (the one you chose). A row that
            stands for several consecutive cuts (`row.layers`) is labelled
            "first…last" and marked if it holds `highlight`.
        title: the figure's title.

    Returns:
        The matplotlib `Figure`.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("No cut candidates to draw: the model has no single-layer cut.")
    plt = _pyplot()
    # A row may stand for consecutive cuts that send the same bytes (`layers`).
    cuts = [tuple(getattr(row, "layers", None) or (row.layer,)) for row in rows]
    names = [c[0] if len(c) == 1 else f"{c[0]}…{c[-1]}" for c in cuts]
    bytes_ = [np.nan if row.bytes_per_sample is None else float(row.bytes_per_sample)
              for row in rows]
    absolute = [getattr(row, "client_flops", None) for row in rows]
    if any(value for value in absolute):  # rows with absolute FLOP counts
        divisor, unit = _scale([float(v or 0) for v in absolute], "FLOPs")
        flops = [float(v or 0) / divisor for v in absolute]
        flops_label = f"client forward {unit} per sample"
    else:
        flops = [100.0 * float(getattr(row, "client_flops_fraction", math.nan)) for row in rows]
        flops_label = "client share of forward FLOPs (%)"
    b_divisor, b_unit = _scale(bytes_)
    refused = [getattr(row, "refused", None) is not None for row in rows]
    colours = ["lightgray" if r else ("tab:orange" if highlight in c else "tab:blue")
               for r, c in zip(refused, cuts, strict=True)]
    figure, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.55 * len(rows) + 4), 3.8))
    positions = np.arange(len(rows))
    axes[0].bar(positions, np.asarray(bytes_) / b_divisor, color=colours)
    axes[0].set(ylabel=f"{b_unit} sent per sample", title="Bytes crossing the cut")
    axes[1].bar(positions, flops, color=colours)
    axes[1].set(ylabel=flops_label, title="Client compute")
    for axis in axes:
        axis.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
        axis.set_xlabel("cut after layer")
        axis.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_rounds(curves: Mapping[str, Sequence[float]], centralized=None,
                metric: str = "accuracy", title: str | None = None):
    """A metric after each round of round-based training, one line per scheme.

    Args:
        curves: `{label: [value after round 1, after round 2, ...]}`, e.g.
            `{"round-robin": [...], "SplitFed": [...]}`.
        centralized: the reference: a number (drawn as a horizontal line), a
            list (one value per epoch of centralized training, drawn against
            the same axis: one epoch sees all the data, as one round does), or
            `{label: number or list}` for several references.
        metric: the metric's name, for the axis.
        title: the figure's title.

    Returns:
        The matplotlib `Figure`.
    """
    if not curves:
        raise ValueError("`curves` is empty; pass {label: [value per round]}.")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for label, values in curves.items():
        values = np.asarray(values, dtype=float)
        axis.plot(np.arange(1, len(values) + 1), values, marker="o", label=label)
    references = centralized if isinstance(centralized, Mapping) else (
        {} if centralized is None else {"centralized": centralized})
    for label, reference in references.items():
        if np.ndim(reference) == 0:
            axis.axhline(float(reference), color="black", linestyle="--", linewidth=1,
                         label=f"{label} ({float(reference):.3f})")
        else:
            values = np.asarray(reference, dtype=float)
            axis.plot(np.arange(1, len(values) + 1), values, "k--", marker="s", markersize=3,
                      label=f"{label} (per epoch)")
    axis.set(xlabel="round", ylabel=metric, title=title or f"{metric} after each round")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _up_down(value) -> tuple[float, float]:
    if hasattr(value, "history"):
        value = value.history
    if isinstance(value, Mapping):
        up, down = value.get("bytes_up", 0), value.get("bytes_down", 0)
        return float(np.sum(up)), float(np.sum(down))
    if isinstance(value, Sequence) and len(value) == 2:
        return float(value[0]), float(value[1])
    raise TypeError(f"Expected (bytes_up, bytes_down), a dict with those keys or a History, "
                    f"received {value!r}.")


def plot_bytes(parties: Mapping, title: str | None = "Bytes on the wire"):
    """Bytes sent up (client to server) and down, per party or per run.

    Args:
        parties: `{label: (bytes_up, bytes_down)}`; a value may also be a
            `History` or a dict with `bytes_up`/`bytes_down` (lists are summed
            over epochs).
        title: the figure's title.

    Returns:
        The matplotlib `Figure`.
    """
    if not parties:
        raise ValueError("`parties` is empty; pass {label: (bytes_up, bytes_down)}.")
    values = {label: _up_down(value) for label, value in parties.items()}
    divisor, unit = _scale([v for pair in values.values() for v in pair])
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(values) + 2.5), 3.6))
    positions = np.arange(len(values))
    up = np.array([pair[0] for pair in values.values()]) / divisor
    down = np.array([pair[1] for pair in values.values()]) / divisor
    axis.bar(positions - 0.2, up, width=0.4, label="up (activations, labels)")
    axis.bar(positions + 0.2, down, width=0.4, label="down (gradients)")
    axis.set_xticks(positions, list(values), rotation=20 if len(values) > 4 else 0)
    axis.set(ylabel=unit, title=title)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_shards(shards, labels: Sequence[str] | None = None,
                title: str | None = "Class mix per client"):
    """How many samples of each class every client holds (stacked bars): non-IID at a glance.

    Args:
        shards: `[(x, y), ...]` as `keras_split.sharding` returns them, or a list of label arrays.
        labels: class names, by label value.
        title: the figure's title.

    Returns:
        The matplotlib `Figure`.
    """
    ys = [np.asarray(s[1] if isinstance(s, tuple) else s) for s in shards]
    if not ys:
        raise ValueError("`shards` is empty.")
    ys = [y.reshape(len(y), -1)[:, 0] if y.ndim > 1 else y for y in ys]
    classes = int(max((y.max() for y in ys if len(y)), default=0)) + 1
    if labels is not None:
        classes = max(classes, len(labels))
    counts = np.array([np.bincount(y.astype(int), minlength=classes) for y in ys])
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5.0, 0.8 * len(ys) + 3), 3.6))
    bottom = np.zeros(len(ys))
    for c in range(classes):
        name = labels[c] if labels is not None and c < len(labels) else f"class {c}"
        axis.bar(np.arange(len(ys)), counts[:, c], bottom=bottom, label=name)
        bottom += counts[:, c]
    axis.set_xticks(np.arange(len(ys)), [f"client {i}" for i in range(len(ys))])
    axis.set(ylabel="samples", title=title)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return figure


def plot_tradeoff(curves: Mapping[str, Sequence], xlabel: str = "leakage (lower leaks less)",
                  ylabel: str = "test accuracy", baseline: float | None = None,
                  baseline_label: str = "baseline", title: str | None = None):
    """Accuracy against leakage, one curve per defence, each point labelled by its setting.

    Args:
        curves: `{defence: [(setting, leakage, accuracy), ...]}`, e.g.
            `{"NoPeek (alpha)": [(0, 0.71, 0.86), (1, 0.43, 0.84)]}`.
        xlabel, ylabel: the axes.
        baseline: a leakage reference drawn as a vertical line (the mean
            image's SSIM, the shuffled-pairs dCor).
        baseline_label: its legend entry.
        title: the figure's title.

    Returns:
        The matplotlib `Figure`.
    """
    if not curves:
        raise ValueError("`curves` is empty; pass {defence: [(setting, leakage, accuracy)]}.")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for name, points in curves.items():
        points = list(points)
        if any(len(point) != 3 for point in points):
            raise ValueError(f"Each point of {name!r} must be (setting, leakage, accuracy).")
        xs = [float(p[1]) for p in points]
        ys = [float(p[2]) for p in points]
        axis.plot(xs, ys, marker="o", label=name)
        for setting, x, y in points:
            axis.annotate(f"{setting:g}" if isinstance(setting, (int, float)) else str(setting),
                          (x, y), fontsize=8, textcoords="offset points", xytext=(4, 4))
    if baseline is not None:
        axis.axvline(baseline, color="gray", linestyle="--", label=baseline_label)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title or "Accuracy against leakage")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_label_leakage(results: Mapping, title: str | None = "Label leakage per defence"):
    """The norm and cosine attacks' AUC for each defence (0.5 is chance).

    Args:
        results: `{defence: LabelLeakageResult}` (from
            `keras_split.privacy.label_leakage`) or `{defence: (norm_auc, cosine_auc)}`.
        title: the figure's title.

    Returns:
        The matplotlib `Figure`.
    """
    if not results:
        raise ValueError("`results` is empty; pass {defence: label_leakage(...)}.")
    pairs = {}
    for name, result in results.items():
        if hasattr(result, "norm_auc"):
            pairs[name] = (float(result.norm_auc), float(result.cosine_auc))
        else:
            norm, cosine = result
            pairs[name] = (float(norm), float(cosine))
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5.0, 1.3 * len(pairs) + 2.5), 3.8))
    positions = np.arange(len(pairs))
    axis.bar(positions - 0.2, [p[0] for p in pairs.values()], width=0.4, label="norm attack")
    axis.bar(positions + 0.2, [p[1] for p in pairs.values()], width=0.4, label="cosine attack")
    axis.axhline(0.5, color="black", linestyle="--", linewidth=1, label="chance")
    axis.set_xticks(positions, list(pairs), rotation=20 if len(pairs) > 3 else 0, ha="right"
                    if len(pairs) > 3 else "center")
    axis.set(ylabel="attack AUC (higher leaks more)", ylim=(0, 1.05), title=title)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return figure


def plot_bars(values: Mapping[str, float], ylabel: str, title: str | None = None,
              log: bool = False):
    """One bar per entry (artefact sizes, step latencies), with its value printed on it.

    Args:
        values: `{label: number}`.
        ylabel: the axis label (with its unit).
        title: the figure's title.
        log: a logarithmic axis (for sizes that differ by orders of magnitude).

    Returns:
        The matplotlib `Figure`.
    """
    if not values:
        raise ValueError("`values` is empty; pass {label: number}.")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(values) + 2.5), 3.8))
    positions = np.arange(len(values))
    heights = [float(v) for v in values.values()]
    bars = axis.bar(positions, heights)
    axis.bar_label(bars, labels=[f"{h:.3g}" for h in heights], fontsize=8)
    axis.set_xticks(positions, list(values), rotation=25 if len(values) > 3 else 0,
                    ha="right" if len(values) > 3 else "center", fontsize=8)
    if log:
        axis.set_yscale("log")
    axis.set(ylabel=ylabel, title=title)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure
