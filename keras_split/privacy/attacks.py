"""Attacks on what crosses the cut, to measure how much a split leaks.

Split learning keeps the raw data on the client, but two things cross the cut
and each can be turned against its sender:

1. **Cut activations** (client to server). A server that obtains some
   (input, activation) pairs (a leaked sample, a public look-alike dataset)
   trains an inverse network from activations to inputs and reconstructs
   every other input it is sent: `model_inversion`. Distance correlation
   between inputs and activations measures the same dependence without an
   attacker model: `dcor_leakage`.
2. **Cut gradients** (server to client). On a binary task the gradient the
   server returns for a sample is `(p - y)` times the gradient of the logit,
   so its norm and its sign along a common direction give the label away
   (Li et al., ICLR 2022): `label_leakage`, on gradients recorded by
   `collect_cut_gradients`.

`audit(split, x, y, x_test)` runs them all on a trained split and prints one
table. Each attack returns a dataclass of numbers; the ones people would
rather look at also draw a matplotlib figure (`plot()`; matplotlib is
optional, `pip install 'keras-split[plot]'`).

The attacks are measurements for the owner of a split, run with both halves
in hand; they are not part of training and change nothing in it (except
`collect_cut_gradients` and an `audit` without recorded gradients, which
train, as they say).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_split.messages import Activations, Reply
from keras_split.privacy.dcor import distance_correlation
from keras_split.transport import Transport
from keras_split_wire.optional import require


def _pyplot():
    return require("matplotlib.pyplot", "Privacy plots", "keras-split[plot]")


# -- the cut as a function ---------------------------------------------------------


def _cut_function(client) -> Callable[[np.ndarray], np.ndarray]:
    """x -> the cut activations, one row per sample (several cut tensors concatenated)."""
    if isinstance(client, keras.Model):
        def run(x):
            return client(x, training=False)
    elif callable(client):
        run = client
    else:
        raise TypeError("`client` must be a keras.Model (the client half) or a function from "
                        f"inputs to cut activations; received {type(client).__name__}.")

    def cut(x):
        outputs = run(x)
        if isinstance(outputs, (list, tuple)):
            return np.concatenate([np.asarray(o).reshape(len(o), -1) for o in outputs], axis=1)
        return np.asarray(outputs)

    return cut


def _cut_activations(client, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    cut = _cut_function(client)
    return np.concatenate([cut(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


# -- 1. model inversion ----------------------------------------------------------------


@dataclass
class InversionResult:
    """What an inverse network recovers from cut activations, on held-out inputs.

    Inputs are compared on a [0, 1] scale (min-max of the attacker's training
    inputs), so MSE and SSIM read the same for uint8 and float images.

    Attributes:
        mse: mean squared error of the reconstructions.
        ssim: mean SSIM (`tf.image.ssim`, max_val 1) for image inputs, else None.
        baseline_mse, baseline_ssim: the same for the mean training image,
            the best guess with no activations at all. An attack beats the
            baseline when its MSE is lower (SSIM higher).
        originals, reconstructions: a few held-out inputs and their
            reconstructions, on the [0, 1] scale (for `plot`).
        decoder: the trained inverse network.
    """

    mse: float
    ssim: float | None
    baseline_mse: float
    baseline_ssim: float | None
    originals: np.ndarray = field(repr=False)
    reconstructions: np.ndarray = field(repr=False)
    decoder: keras.Model | None = field(default=None, repr=False)

    def plot(self, n: int = 8):
        """A grid: originals on the top row, reconstructions below. Returns the figure."""
        plt = _pyplot()
        n = min(n, len(self.originals))
        figure, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.0), squeeze=False)
        for row, (images, title) in enumerate([(self.originals, "original"),
                                               (self.reconstructions, "reconstructed")]):
            for i in range(n):
                axis = axes[row][i]
                image = np.asarray(images[i])
                if image.ndim == 3 and image.shape[-1] == 1:
                    image = image[..., 0]
                if image.ndim == 1:  # a flat input: shown as a strip
                    image = image[None, :]
                axis.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)
                axis.set_xticks([])
                axis.set_yticks([])
            axes[row][0].set_ylabel(title)
        ssim = "" if self.ssim is None else (
            f", SSIM {self.ssim:.3f} (mean image {self.baseline_ssim:.3f})")
        figure.suptitle(f"Model inversion: MSE {self.mse:.4f} (mean image {self.baseline_mse:.4f})"
                        f"{ssim}")
        figure.tight_layout()
        return figure


def inversion_decoder(cut_shape: Sequence[int], input_shape: Sequence[int],
                      hidden: int = 256) -> keras.Model:
    """A small inverse network from cut activations to inputs in [0, 1] (sigmoid output).

    Spatial cuts (height, width, channels) feeding image inputs get a
    convolutional decoder: stride-2 `Conv2DTranspose` blocks until the
    input's size is reached, a crop to it, and a 3x3 convolution to its
    channels. Anything else (a flat cut, non-image inputs) gets a dense one:
    `Dense(hidden)` then a `Dense` to every input value.

    Args:
        cut_shape: one sample's cut activations, e.g. `(5, 5, 32)` or `(64,)`.
        input_shape: one input sample, e.g. `(28, 28, 1)` or `(20,)`.
        hidden: units of the dense decoder's hidden layer.
    """
    cut_shape, input_shape = tuple(cut_shape), tuple(input_shape)
    layers = keras.layers
    z = keras.Input(cut_shape, name="cut")
    if len(cut_shape) == 3 and len(input_shape) == 3:
        (h, w, c), (height, width, channels) = cut_shape, input_shape
        x = z
        filters = max(32, c)
        while h < height or w < width:
            strides = (2 if h < height else 1, 2 if w < width else 1)
            h, w = h * strides[0], w * strides[1]
            x = layers.Conv2DTranspose(filters, 3, strides=strides, padding="same",
                                       activation="relu")(x)
            filters = max(16, filters // 2)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        # Centred: the decoder's extra border is split between both sides.
        x = layers.Cropping2D((((h - height) // 2, (h - height + 1) // 2),
                               ((w - width) // 2, (w - width + 1) // 2)))(x)
        out = layers.Conv2D(channels, 3, padding="same", activation="sigmoid")(x)
        return keras.Model(z, out, name="inversion_decoder")
    x = layers.Flatten()(z) if len(cut_shape) > 1 else z
    x = layers.Dense(hidden, activation="relu")(x)
    x = layers.Dense(int(np.prod(input_shape)), activation="sigmoid")(x)
    out = layers.Reshape(input_shape)(x)
    return keras.Model(z, out, name="inversion_decoder")


def _mean_ssim(a: np.ndarray, b: np.ndarray) -> float:
    size = min(11, a.shape[1], a.shape[2])
    return float(tf.reduce_mean(tf.image.ssim(tf.constant(a, tf.float32),
                                              tf.constant(b, tf.float32),
                                              max_val=1.0, filter_size=size)))


def model_inversion(client, x_train, x_test, *, epochs: int = 30, batch_size: int = 64,
                    learning_rate: float = 1e-3, decoder: keras.Model | None = None,
                    examples: int = 8, verbose: int = 0) -> InversionResult:
    """Train an inverse network on leaked (input, activation) pairs; reconstruct held-out inputs.

    The attacker (the server, or anyone on the link) holds `x_train` with the
    activations the client sends for it, fits a decoder from activations to
    inputs (`inversion_decoder`, MSE loss, Adam), and reconstructs `x_test`
    from its activations alone. Inputs are scaled to [0, 1] with the min and
    max of `x_train`.

    Args:
        client: the client half (`split.client`) or a function from a batch of
            inputs to its cut activations (a defended client, a noisy link).
        x_train: the inputs whose activations leaked (a few hundred suffice
            for small images).
        x_test: held-out inputs to reconstruct.
        epochs, batch_size, learning_rate: the decoder's training.
        decoder: your own inverse network (cut activations -> inputs in
            [0, 1]), instead of `inversion_decoder`'s.
        examples: how many held-out reconstructions to keep for `plot`.
        verbose: the decoder's `fit` verbosity.

    Returns:
        An `InversionResult` (MSE and SSIM against the mean-image baseline).

    Example:

    ```python
    result = model_inversion(split.client, x_train[:1000], x_test)
    print(result.mse, result.baseline_mse)
    result.plot().savefig("inversion.png")
    ```

    Reference:
        Z. He, T. Zhang, R. B. Lee, "Model inversion attacks against
        collaborative inference", ACSAC 2019.
    """
    x_train, x_test = np.asarray(x_train), np.asarray(x_test)
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError(f"`x_train` and `x_test` must hold samples; received {len(x_train)} "
                         f"and {len(x_test)}.")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"`x_train` and `x_test` must hold inputs of one shape; received "
                         f"{x_train.shape[1:]} vs. {x_test.shape[1:]}.")
    z_train, z_test = _cut_activations(client, x_train), _cut_activations(client, x_test)
    low, high = float(x_train.min()), float(x_train.max())
    span = high - low if high > low else 1.0
    t_train = ((x_train.astype(np.float32) - low) / span).astype(np.float32)
    t_test = ((x_test.astype(np.float32) - low) / span).astype(np.float32)
    images = t_train.ndim in (3, 4)
    if t_train.ndim == 3:  # (n, height, width): one channel
        t_train, t_test = t_train[..., None], t_test[..., None]
    if decoder is None:
        decoder = inversion_decoder(z_train.shape[1:], t_train.shape[1:])
    decoder.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    decoder.fit(z_train, t_train, epochs=epochs, batch_size=batch_size, verbose=verbose)
    # Called directly rather than with `predict`, which builds a new function
    # for every new decoder (and warns about retracing when attacks repeat).
    reconstructed = np.concatenate([np.asarray(decoder(z_test[i:i + 256], training=False),
                                               np.float32)
                                    for i in range(0, len(z_test), 256)]).reshape(t_test.shape)
    mean_image = np.broadcast_to(t_train.mean(axis=0), t_test.shape)
    mse = float(np.mean((reconstructed - t_test) ** 2))
    baseline_mse = float(np.mean((mean_image - t_test) ** 2))
    ssim = baseline_ssim = None
    if images:
        ssim = _mean_ssim(reconstructed, t_test)
        baseline_ssim = _mean_ssim(np.ascontiguousarray(mean_image), t_test)
    return InversionResult(mse=mse, ssim=ssim, baseline_mse=baseline_mse,
                           baseline_ssim=baseline_ssim, originals=t_test[:examples],
                           reconstructions=reconstructed[:examples], decoder=decoder)


# -- 2. label leakage from cut gradients -------------------------------------------------


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for the binary `labels` (True = positive).

    The probability that a random positive scores higher than a random
    negative, ties counting one half (the Mann-Whitney U statistic divided by
    the number of positive-negative pairs). NaN when a class is absent.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"`scores` and `labels` must have one entry per sample (got "
                         f"{scores.size} vs. {labels.size}).")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    # Ranks 1..n, each group of tied scores sharing the mean of its ranks.
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_ranks = ends - (counts - 1) / 2.0
    rank_sum = mean_ranks[inverse][labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


@dataclass
class CutGradients:
    """Per-sample cut gradients a client received, batch by batch, with the true labels.

    Attributes:
        gradients: one array per batch, one row per sample (all cut tensors
            of a sample flattened and concatenated).
        labels: the true labels of each batch (for scoring the attacks).
    """

    gradients: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.gradients)


def _rows(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).reshape(len(a), -1) for a in arrays],
                          axis=1)


def _classes(labels) -> np.ndarray:
    """One class per sample: integer labels as they are, one-hot rows by argmax."""
    array = np.asarray(labels)
    if array.ndim >= 2 and array.shape[-1] > 1:
        return np.argmax(array, axis=-1).reshape(len(array))
    return array.reshape(len(array))


class _Recording(Transport):
    """Records the cut gradients of each training reply as the client receives them."""

    def __init__(self, inner: Transport, sink: CutGradients):
        super().__init__()
        self.inner, self.sink = inner, sink
        self.bytes = inner.bytes

    def _exchange(self, message: Activations) -> tuple[Reply, int, int]:
        reply = self.inner.exchange(message)
        if message.mode == "train" and reply.gradients and message.labels is not None:
            self.sink.gradients.append(_rows(reply.gradients))
            self.sink.labels.append(_classes(keras.tree.flatten(message.labels)[0]))
        return reply, 0, 0  # counted by the inner transport


def collect_cut_gradients(split, x, y, *, batch_size: int = 32, epochs: int = 1,
                          shuffle: bool = True, seed: int | None = None,
                          verbose: int = 0) -> CutGradients:
    """Train `split` on (x, y) and record every cut gradient its client receives.

    This is the view of a curious client: the replies as they arrive,
    after any defence the server applies. The server returns, for a batch,
    the gradient of the batch's mean loss with respect to the cut
    activations; since each sample's activations enter only its own loss
    term, row `i` of that batch gradient is sample `i`'s own gradient
    divided by the batch size. So the per-sample gradients are the rows, and
    no per-sample backward pass is needed. (A server half that mixes samples,
    such as BatchNormalization in training mode, makes each row depend
    slightly on the rest of the batch.)

    The labels recorded are the ones the client's fit passes in (the true
    labels, even when a `RandomizedLabels` transport randomizes what the
    server sees).

    Args:
        split: a compiled `SplitModel` (or anything with `fit` and
            `transport`); it trains, as with `fit`.
        x, y: the training data.
        batch_size, epochs, shuffle, seed, verbose: as in `fit`.

    Returns:
        `CutGradients`, one entry per training step.
    """
    if getattr(split, "transport", None) is None:
        raise ValueError("`split` must be compiled first: call split.compile(...), then "
                         "collect_cut_gradients(split, x, y).")
    sink = CutGradients()
    inner = split.transport
    split.transport = _Recording(inner, sink)
    try:
        split.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=shuffle, seed=seed,
                  verbose=verbose)
    finally:
        split.transport = inner
    return sink


@dataclass
class LabelLeakageResult:
    """How well a client recovers the server's labels from the cut gradients.

    Attributes:
        norm_auc: mean over batches of the norm attack's ROC AUC (score =
            gradient norm). 0.5 is chance, 1.0 reads every label.
        cosine_auc: mean over batches of the cosine attack's ROC AUC (score
            = cosine similarity to a reference positive's gradient).
        norm_aucs, cosine_aucs: the AUC of each batch (NaN where a batch
            lacks a class, or for cosine, a positive besides the reference).
    """

    norm_auc: float
    cosine_auc: float
    norm_aucs: np.ndarray = field(repr=False)
    cosine_aucs: np.ndarray = field(repr=False)

    def plot(self):
        """The AUC of each batch over training, for both attacks. Returns the figure."""
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(6, 3))
        steps = np.arange(1, len(self.norm_aucs) + 1)
        axis.plot(steps, self.norm_aucs, ".", label=f"norm (mean {self.norm_auc:.3f})")
        axis.plot(steps, self.cosine_aucs, ".", label=f"cosine (mean {self.cosine_auc:.3f})")
        axis.axhline(0.5, color="gray", linewidth=0.8)
        axis.set(xlabel="training step", ylabel="leak AUC", ylim=(0, 1.02),
                 title="Label leakage from cut gradients")
        axis.legend(loc="lower right")
        figure.tight_layout()
        return figure


def _cosine_auc(rows: np.ndarray, positive: np.ndarray, reference) -> float:
    if reference is None:
        # The attacker knows one positive label in the batch (Li et al.): the
        # first positive is the reference, and is left out of the scoring.
        first = np.flatnonzero(positive)
        if len(first) == 0:
            return math.nan
        keep = np.ones(len(rows), bool)
        keep[first[0]] = False
        reference, rows, positive = rows[first[0]], rows[keep], positive[keep]
    reference = np.asarray(reference, np.float64).ravel()
    if reference.shape[0] != rows.shape[1]:
        raise ValueError(f"`reference` has {reference.shape[0]} values; a sample's cut gradient "
                         f"has {rows.shape[1]}.")
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(reference)
    cosine = np.divide(rows @ reference, norms, out=np.zeros(len(rows)), where=norms > 0)
    return roc_auc(cosine, positive)


def label_leakage(cut_gradients, labels=None, *, positive=1,
                  reference=None) -> LabelLeakageResult:
    """The norm and cosine (direction) attacks on cut gradients, scored by ROC AUC per batch.

    For a binary task whose positive class is the rarer one, the server's
    gradient at the cut for sample `i` is `(p_i - y_i)` times the gradient of
    the logit: positives (`p - 1`, large in magnitude while the model
    predicts the majority) and negatives (`p`, small) differ in norm, and
    point in opposite directions. Two attacks, both from Li et al.:

    - **norm**: score = the gradient's L2 norm.
    - **cosine**: score = cosine similarity to a reference gradient: by
      default, in each batch, the first positive's (the one label the
      attacker is assumed to know; it is left out of that batch's AUC), or a
      fixed `reference` vector you give.

    Each attack's AUC is computed per batch (gradients change over training)
    and averaged over the batches where it is defined.

    Args:
        cut_gradients: a `CutGradients` (then `labels` is not given), a list
            of per-batch arrays (one row or cut tensor slice per sample), or
            one array (one batch).
        labels: the true labels, matching `cut_gradients` batch by batch.
        positive: the positive class (others are negatives).
        reference: a fixed reference gradient for the cosine attack.

    Returns:
        A `LabelLeakageResult`.

    Example:

    ```python
    grads = collect_cut_gradients(split, x_train, y_train, batch_size=64)
    leak = label_leakage(grads)
    print(leak.norm_auc, leak.cosine_auc)
    ```

    Reference:
        Oscar Li, Jiankai Sun, Xin Yang, Weihao Gao, Hongyi Zhang, Junyuan Xie,
        Virginia Smith, Chong Wang. "Label Leakage and Protection in Two-party
        Split Learning". ICLR 2022. https://arxiv.org/abs/2102.08504
    """
    if isinstance(cut_gradients, CutGradients):
        if labels is not None:
            raise ValueError("`labels` come with a CutGradients; pass one or the other.")
        batches, labels = cut_gradients.gradients, cut_gradients.labels
    elif isinstance(cut_gradients, (list, tuple)):
        batches = list(cut_gradients)
    else:
        batches, labels = [cut_gradients], [labels]
    if labels is None or len(labels) != len(batches):
        raise ValueError(f"Expected one label array per batch of gradients ({len(batches)}); "
                         f"received {None if labels is None else len(labels)}.")
    norm_aucs, cosine_aucs = [], []
    for i, (grads, batch_labels) in enumerate(zip(batches, labels, strict=True)):
        rows = np.asarray(grads, np.float64).reshape(len(grads), -1)
        is_positive = _classes(batch_labels) == positive
        if len(is_positive) != len(rows):
            raise ValueError(f"Batch {i} has {len(rows)} gradients but {len(is_positive)} "
                             "labels; expected one label per sample.")
        norm_aucs.append(roc_auc(np.linalg.norm(rows, axis=1), is_positive))
        cosine_aucs.append(_cosine_auc(rows, is_positive, reference))
    norm_aucs, cosine_aucs = np.array(norm_aucs), np.array(cosine_aucs)
    return LabelLeakageResult(norm_auc=_nanmean(norm_aucs), cosine_auc=_nanmean(cosine_aucs),
                              norm_aucs=norm_aucs, cosine_aucs=cosine_aucs)


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else math.nan


# -- 3. distance correlation ------------------------------------------------------------------


@dataclass
class DcorLeakage:
    """Distance correlation between inputs and cut activations, over fixed-size batches.

    Attributes:
        dcor: the mean over batches (0: independent, 1: one determines the
            other up to a similarity). Sample dCor is biased upwards at small
            batch sizes, so compare values at one batch size only.
        per_batch: each batch's value.
        batch_size: the batch size used.
        baseline: the same measurement with the activations shuffled against
            the inputs (what independence reads at this batch size).
        label_reference: when labels were given, dCor(x, labels) on the same
            batches (class indices one-hot): what a cut holding the labels and
            nothing else would read. A cut that lets the server predict the
            labels rarely reads much below it, so it is the scale to read
            `dcor` against (on the shipped chest X-rays it is about 0.46,
            against 0.90 for an undefended cut). None without labels.
    """

    dcor: float
    per_batch: np.ndarray = field(repr=False)
    batch_size: int
    baseline: float
    label_reference: float | None = None


def _label_rows(y, samples: int) -> np.ndarray:
    """Labels as one row of floats per sample; class indices one-hot, so that
    every two different classes are equally far apart (as integers, class 0
    would be nearer class 1 than class 9)."""
    y = np.asarray(y)
    if len(y) != samples:
        raise ValueError(f"`y` has {len(y)} labels, but `x` has {samples} samples; pass one "
                         "label per sample.")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"`y` must hold numbers (class indices, one-hot rows or values); "
                         f"received dtype {y.dtype}.")
    if y.dtype.kind in "biu" and y.reshape(samples, -1).shape[1] == 1:
        indices = y.reshape(samples).astype(np.int64)
        classes, inverse = np.unique(indices, return_inverse=True)
        return np.eye(len(classes), dtype=np.float32)[inverse]
    return y.reshape(samples, -1).astype(np.float32)


def dcor_leakage(client, x, batch_size: int = 128, seed: int = 0, y=None) -> DcorLeakage:
    """dCor(x, cut activations) on held-out data, at a fixed batch size, averaged over batches.

    Distance correlation measures any dependence (not only linear) between
    the inputs and what the server receives; NoPeek training lowers it. Only
    full batches are used (the last partial one is dropped), since the
    sample statistic depends on the batch size.

    Args:
        client: the client half or a function from inputs to cut activations.
        x: held-out inputs (at least `batch_size`).
        batch_size: samples per dCor estimate.
        seed: the shuffle of the independence baseline.
        y: optional labels of `x` (class indices, one-hot rows or values):
            also measure dCor(x, y) on the same batches, the reference a
            cut that serves the task is read against.

    Returns:
        A `DcorLeakage`.

    Reference:
        G. J. Székely, M. L. Rizzo, N. K. Bakirov, "Measuring and testing
        dependence by correlation of distances", Annals of Statistics 2007;
        P. Vepakomma et al., "NoPeek: Information leakage reduction to share
        activations in distributed deep learning", 2020.
    """
    x = np.asarray(x)
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"`batch_size` must be an integer >= 2, received {batch_size!r}.")
    if len(x) < batch_size:
        raise ValueError(f"`x` has {len(x)} samples, fewer than one batch of {batch_size}. "
                         "Pass more samples or a smaller batch_size.")
    labels = None if y is None else _label_rows(y, len(x))
    z = _cut_activations(client, x)
    flat_x = x.reshape(len(x), -1).astype(np.float32)
    flat_z = z.reshape(len(z), -1).astype(np.float32)
    shuffled = flat_z[np.random.default_rng(seed).permutation(len(flat_z))]
    values, baseline, reference = [], [], []
    for start in range(0, len(x) - batch_size + 1, batch_size):
        part = slice(start, start + batch_size)
        values.append(float(distance_correlation(flat_x[part], flat_z[part])))
        baseline.append(float(distance_correlation(flat_x[part], shuffled[part])))
        if labels is not None:
            reference.append(float(distance_correlation(flat_x[part], labels[part])))
    per_batch = np.array(values)
    return DcorLeakage(dcor=float(per_batch.mean()), per_batch=per_batch, batch_size=batch_size,
                       baseline=float(np.mean(baseline)),
                       label_reference=float(np.mean(reference)) if reference else None)


# -- the audit ----------------------------------------------------------------------------------


@dataclass
class AuditRow:
    attack: str
    metric: str
    value: float | None
    baseline: float | None


@dataclass
class AuditReport:
    """One row per measurement; `str(report)` is the table `audit` prints.

    Attributes:
        rows: `AuditRow(attack, metric, value, baseline)`s.
        inversion, label, dcor, hijack: the full results behind the rows
            (None when that attack did not run; `hijack` is a pair of
            `HijackResult`s, without and with the detector).
    """

    rows: list[AuditRow]
    inversion: InversionResult | None = None
    label: LabelLeakageResult | None = None
    dcor: DcorLeakage | None = None
    hijack: Any = None

    def __str__(self) -> str:
        def number(value):
            return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
                else f"{value:.4g}"

        table = [("attack", "metric", "value", "baseline")] + [
            (r.attack, r.metric, number(r.value), number(r.baseline)) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        lines = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                           for i, (cell, width) in enumerate(zip(row, widths, strict=True)))
                 for row in table]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)


def audit(split, x, y, x_test, *, batch_size: int = 32, cut_gradients: CutGradients | None = None,
          label_epochs: int = 1, positive=1, inversion_samples: int | None = 2000,
          inversion_epochs: int = 30, dcor_batch_size: int = 128, hijack_steps: int = 0,
          hijack_knows_weights: bool = True, num_classes: int | None = None,
          seed: int | None = 0, y_test=None,
          print_fn: Callable[[str], None] | None = print) -> AuditReport:
    """Run every attack on a trained split and print one table (attack, metric, value, baseline).

    1. Label leakage (norm and cosine attacks, mean AUC per batch; baseline
       0.5, chance) on `cut_gradients`, or, when not given, on the gradients
       recorded while `split` trains `label_epochs` more epoch(s) on (x, y)
       with `batch_size` (through its own transport, so with its defences).
       Skipped when `y` has no `positive` sample.
    2. Model inversion from the client's activations: the attacker holds
       (x, activations) pairs (at most `inversion_samples` of them) and
       reconstructs `x_test`; MSE and SSIM against the mean-image baseline.
    3. Distance correlation between `x_test` and its activations at
       `dcor_batch_size` (baseline: activations shuffled against the inputs);
       with `y_test`, also dCor(x_test, y_test) on the same batches, the
       reference row: what a cut holding only the labels would read.
       Skipped when `x_test` holds fewer than one batch.
    4. With `hijack_steps > 0`, feature-space hijacking: a copy of the
       client (yours is not touched) trains `hijack_steps` steps on half of
       `x` against a `HijackingServer` holding the other half as public
       data (by default one that supplied the model, so its pilot starts
       from the client's weights: the stronger attack); the reconstruction
       MSE of `x_test` against the mean public image. Then a fresh copy
       trains against it again behind a `HijackDetector`: the step it flags
       the server at (baseline: the step the attack's MSE had halved).
       Needs class labels in `y`.

    Args:
        split: a compiled, trained `SplitModel` (its `client` half and `transport`).
        x, y: training data (the leaked pairs for inversion; the label attack's batches).
        x_test: held-out inputs.
        batch_size, cut_gradients, label_epochs, positive: the label attacks.
        inversion_samples, inversion_epochs: the inversion attack.
        dcor_batch_size: the dCor measurement.
        y_test: optional labels of `x_test`, for the dCor reference row.
        hijack_steps, num_classes: the hijacking run (classes default to
            the largest label + 1).
        hijack_knows_weights: the hijacker supplied the model (False: its
            pilot starts from fresh weights).
        seed: the shuffles of the extra training epoch and of the inversion sample.
        print_fn: where the table goes (None: not printed).

    Returns:
        An `AuditReport` (its rows, and each attack's full result).

    Example:

    ```python
    report = keras_split.privacy.audit(split, x_train, y_train, x_test)
    ```
    """
    rows: list[AuditRow] = []
    label = inversion = dcor = None
    x, x_test = np.asarray(x), np.asarray(x_test)
    if cut_gradients is None and np.any(_classes(np.asarray(y)) == positive):
        cut_gradients = collect_cut_gradients(split, x, y, batch_size=batch_size,
                                              epochs=label_epochs, seed=seed)
    if cut_gradients is not None:
        label = label_leakage(cut_gradients, positive=positive)
        rows += [AuditRow("label leakage: norm", "mean AUC per batch", label.norm_auc, 0.5),
                 AuditRow("label leakage: cosine", "mean AUC per batch", label.cosine_auc, 0.5)]
    leaked = x
    if inversion_samples is not None and len(x) > inversion_samples:
        leaked = x[np.random.default_rng(seed).permutation(len(x))[:inversion_samples]]
    inversion = model_inversion(split.client, leaked, x_test, epochs=inversion_epochs)
    rows.append(AuditRow("model inversion", "MSE (lower leaks more)", inversion.mse,
                         inversion.baseline_mse))
    if inversion.ssim is not None:
        rows.append(AuditRow("model inversion", "SSIM (higher leaks more)", inversion.ssim,
                             inversion.baseline_ssim))
    if len(x_test) >= dcor_batch_size:
        dcor = dcor_leakage(split.client, x_test, batch_size=dcor_batch_size, y=y_test)
        rows.append(AuditRow("distance correlation", f"dCor(x, cut), batch {dcor_batch_size}",
                             dcor.dcor, dcor.baseline))
        if dcor.label_reference is not None:
            rows.append(AuditRow("distance correlation", "dCor(x, labels): the task's own",
                                 dcor.label_reference, dcor.baseline))
    hijack = None
    if hijack_steps > 0:
        hijack = _hijack_rows(split.client, x, np.asarray(y), x_test, hijack_steps, batch_size,
                              num_classes, seed, rows, hijack_knows_weights)
    report = AuditReport(rows=rows, inversion=inversion, label=label, dcor=dcor, hijack=hijack)
    if print_fn is not None:
        print_fn(str(report))
    return report


def _hijack_rows(client, x, y, x_test, steps, batch_size, num_classes, seed, rows,
                 knows_weights):
    from keras_split.privacy.hijack import feature_space_hijacking

    def copy():
        twin = keras.models.clone_model(client)
        twin.set_weights(client.get_weights())
        return twin

    order = np.random.default_rng(seed).permutation(len(x))
    private, public = order[: len(x) // 2], order[len(x) // 2:]
    classes = num_classes or int(_classes(y).max()) + 1
    eval_every = max(1, steps // 10)
    attack = feature_space_hijacking(copy(), x[private], x[public], x_test, steps=steps,
                                     batch_size=batch_size, eval_every=eval_every, seed=seed,
                                     knows_weights=knows_weights)
    guarded = feature_space_hijacking(copy(), x[private], x[public], x_test, steps=steps,
                                      batch_size=batch_size, eval_every=eval_every, seed=seed,
                                      knows_weights=knows_weights, labels=y[private],
                                      detector={"num_classes": max(2, classes), "seed": seed})
    rows.append(AuditRow("feature-space hijacking", f"MSE after {steps} steps (lower leaks more)",
                         attack.mse[-1], attack.baseline_mse))
    rows.append(AuditRow("hijack detector", "flagged at step (baseline: MSE halved at)",
                         None if guarded.detected_at is None else float(guarded.detected_at),
                         None if attack.halved_at is None else float(attack.halved_at)))
    return attack, guarded


__all__ = [
    "AuditReport", "AuditRow", "CutGradients", "DcorLeakage", "InversionResult",
    "LabelLeakageResult", "audit", "collect_cut_gradients", "dcor_leakage",
    "inversion_decoder", "label_leakage", "model_inversion", "roc_auc",
]
