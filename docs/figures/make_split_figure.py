"""Draw docs/figures/split.png, the README's picture of one split training step.

    python docs/figures/make_split_figure.py      # needs matplotlib (keras-split[plot])

The layers are the demo CNN's (`keras_split.apps.demo.build_demo_cnn`) cut at
`pool2`, as in the README's quickstart.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "split.png"
CLIENT = ["image 28x28", "rescale", "conv1", "pool1", "conv2", "pool2"]
SERVER = ["flatten", "dense", "logits", "loss"]
CLIENT_COLOUR, SERVER_COLOUR, LAYER_COLOUR = "#dbe9f6", "#fde8d0", "white"


def _box(ax, x, y, w, h, colour, **kwargs):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=colour, edgecolor="#444444", linewidth=1.2, **kwargs))


def _layers(ax, names, x0, y):
    for i, name in enumerate(names):
        x = x0 + i * 0.78
        ax.add_patch(FancyBboxPatch((x, y), 0.66, 0.5, boxstyle="round,pad=0.01,rounding_size=0.05",
                                    facecolor=LAYER_COLOUR, edgecolor="#666666", linewidth=0.8))
        ax.text(x + 0.33, y + 0.25, name.replace(" ", "\n"), ha="center", va="center",
                fontsize=7.5)
        if i:
            ax.annotate("", (x, y + 0.25), (x - 0.12, y + 0.25),
                        arrowprops={"arrowstyle": "-|>", "color": "#666666", "lw": 0.8})


def _arrow(ax, start, end, colour, text, text_y):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16,
                                 color=colour, linewidth=2))
    ax.text((start[0] + end[0]) / 2, text_y, text, ha="center", va="center", fontsize=8.5,
            color=colour, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})


def main() -> None:
    fig, ax = plt.subplots(figsize=(9.6, 3.3), dpi=100)
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 4.1)
    ax.axis("off")

    _box(ax, 0.2, 0.6, 4.95, 2.9, CLIENT_COLOUR)
    ax.text(2.675, 3.2, "client (a hospital, a phone)", ha="center", fontsize=10,
            weight="bold")
    ax.text(2.675, 2.85, "holds images and labels; runs the layers to the cut",
            ha="center", fontsize=8)
    _layers(ax, CLIENT, 0.4, 1.75)
    ax.text(2.675, 1.0, "raw images never leave the client", ha="center", fontsize=8.5,
            style="italic")

    _box(ax, 8.35, 0.6, 3.45, 2.9, SERVER_COLOUR)
    ax.text(10.075, 3.2, "server", ha="center", fontsize=10, weight="bold")
    ax.text(10.075, 2.85, "runs the layers after the cut", ha="center", fontsize=8.5)
    _layers(ax, SERVER, 8.55, 1.75)
    ax.text(10.075, 1.05, "computes the loss and\nupdates its own layers", ha="center",
            va="center", fontsize=8.5, style="italic")

    ax.plot([6.75, 6.75], [0.35, 3.75], linestyle="--", color="#888888", linewidth=1)
    ax.text(6.75, 3.9, "the cut (after pool2)", ha="center", fontsize=8.5, color="#555555")
    _arrow(ax, (5.3, 2.3), (8.2, 2.3), "#1f5fa8",
           "1. activations at the cut\n(5x5x32 per image) + labels", 2.75)
    _arrow(ax, (8.2, 1.45), (5.3, 1.45), "#b5541c",
           "2. gradient of the loss\nat the cut, same shape", 0.95)
    ax.text(6.0, 0.12, "3. the client finishes backpropagation with that gradient and "
            "updates its own layers", ha="center", fontsize=8.5)
    fig.savefig(OUT, bbox_inches="tight", pad_inches=0.05)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
