"""NoPeek: the client also minimises what its cut activations say about its data.

Split learning sends the server activations, not raw data, yet activations
near the input can be inverted to something close to the raw batch. NoPeek
adds a term to the client's own objective: `alpha * dCor(x, z)`, the distance
correlation between the raw batch `x` and the cut activations `z` it sends
(`keras_split.privacy.distance_correlation`). The client minimises it together
with the model's loss, so the cut keeps what the task needs and sheds the rest.

The protocol is the one split step (`keras_split.protocol`), unchanged:

1. The client runs its half on a batch, under its gradient tape, and computes
   `dCor(x, z)` on the batch as it goes.
2. It sends `z` (and the labels) to the server, exactly as without NoPeek.
3. The server replies with the gradient of the loss at the cut, exactly as
   without NoPeek: it never learns that the client regularises.
4. The client backpropagates, in one backward pass, the server's cut gradient
   through `z` plus the gradient of `alpha * dCor(x, z)`, and updates its
   weights.

Nothing extra crosses the wire, and the server needs no change. The term is
not part of the `loss` that training reports (the model's loss, as Keras
reports it); the batch's dCor is reported beside it as `nopeek_dcor`.

An exported client (`export_client`) trains with the term on the device too:
its `train` adds `cut_gradients`, the derivative written with forward ops, to
the server's cut gradient.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_split.privacy.dcor import distance_correlation, distance_correlation_gradients


@keras.saving.register_keras_serializable(package="keras_split")
class NoPeek:
    """Distance-correlation regularisation of the client's cut (NoPeek).

    Use it where the raw data must not be reconstructible from what the client
    sends: pass it to `compile(..., nopeek=NoPeek(alpha))` of `SplitModel`,
    `SplitClient`, `SplitChain` (the first party), `VerticalSplit` (each party
    against its own inputs), `RoundRobin` or `SplitFed`. The client then adds
    `alpha * dCor(x, z)` to its own loss; the server is unaware.

    dCor is a batch statistic (every sample is compared with every other), so
    its value depends on the batch size: compare runs at the same batch size.
    A larger `alpha` leaks less and costs more accuracy; `alpha=0` trains
    exactly as without NoPeek (and still reports `nopeek_dcor`).

    Args:
        alpha: the weight of the distance correlation in the client's
            objective, a finite number >= 0.

    Calling it on `(inputs, activations)` (what a `ClientRole` does) returns
    `(alpha * dCor, {"nopeek_dcor": dCor})`.

    Example:

    ```python
    split = keras_split.split(model, cut="pool2")
    split.compile(optimizer="adam", loss=loss, metrics=["accuracy"],
                  nopeek=keras_split.privacy.NoPeek(alpha=1.0))
    history = split.fit(x, y, batch_size=64, epochs=5)
    history.history["nopeek_dcor"]  # the batches' dCor(x, cut), per epoch
    ```

    Reference:
        Vepakomma, Gupta, Swedish and Raskar, "Reducing leakage in distributed
        deep learning for sensitive health data", ICLR 2019 workshop AI for
        social good.
    """

    log_names = ("nopeek_dcor",)

    def __init__(self, alpha: float = 1.0):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or (
                not math.isfinite(alpha) or alpha < 0):
            raise ValueError(f"`alpha` must be a finite number >= 0 (the weight of dCor in the "
                             f"client's loss); received {alpha!r}.")
        self.alpha = float(alpha)

    def __call__(self, inputs, activations):
        dcor = distance_correlation(inputs, activations)
        logs = {"nopeek_dcor": ops.stop_gradient(dcor)}
        if self.alpha == 0:
            # No path from the weights to the term at all (not a zero-weighted
            # one, whose zero gradients would still be added): alpha=0 trains
            # bit for bit as without NoPeek.
            return ops.zeros((), dcor.dtype), logs
        return self.alpha * dcor, logs

    def cut_gradients(self, inputs, activations) -> list | None:
        """`alpha * d dCor(inputs, activations) / d activations`, with forward ops only.

        What an exported client's `train` adds to the server's cut gradients
        (`keras_split.export.export_client`), one tensor per cut tensor; None
        when `alpha` is 0 (nothing to add).
        """
        if self.alpha == 0:
            return None
        return [self.alpha * g for g in distance_correlation_gradients(inputs, activations)]

    def get_config(self) -> dict:
        return {"alpha": self.alpha}

    @classmethod
    def from_config(cls, config: dict) -> NoPeek:
        return cls(**config)

    def __repr__(self) -> str:
        return f"NoPeek(alpha={self.alpha:g})"
