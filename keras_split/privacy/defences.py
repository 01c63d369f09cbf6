"""Defences for what crosses the cut: noisy activations, perturbed gradients, private labels.

Split learning sends two things a curious peer can exploit (see
`keras_split.privacy.attacks`): the client's cut activations, from which a
server can learn to reconstruct the inputs, and the server's cut gradients,
from which a client can read the server's labels. Each defence here composes
with stock Keras objects and sits where the thing it protects crosses:

1. **Activations, client side**: `CutNoise`, a Keras layer appended to the
   client half (`add_cut_noise`): per-sample norm clipping, then Gaussian or
   Laplace noise. It is NOT differential privacy (see the class).
2. **Labels, server side of the reply** (vanilla split learning, the server
   holds the labels): `MaxNormAlignment` and `GaussianGradientNoise`, role
   wrappers around a `ServerRole` that perturb the cut gradients before they
   leave the server (Li et al., ICLR 2022). Both are
   `keras_split.roles.MessageHandler`s, so `InProcessTransport(role)` and
   `SplitServer(role=...)` use them alike.
3. **Labels, client side, where they cross**: `randomized_response` and the
   `RandomizedLabels` transport flip labels by randomized response. This one
   IS epsilon-label-differential privacy (see `randomized_response`).
4. **Labels that never leave the client: U-shaped training.** The client
   holds the first and the last segments and the labels, the server the
   middle; only activations and gradients cross, never labels. Build it with
   `keras_split.split_chain(model, cuts=[c1, c2]).compile(..., labels="client")`
   (`keras_split.configurations.chain`). What it does not hide: the gradient
   the client's last segment sends back to the server is computed from the
   labels, so the server, now in the attacker's seat, can run the same norm
   and direction attacks on it (`benchmarks/privacy.py` measures this).
   Randomized labels (3.) protect that gradient too.

Every defence switched off reproduces plain split training bit for bit
(`CutNoise()`, `GaussianGradientNoise(role, ratio=0)`,
`RandomizedLabels(transport, epsilon=inf)`, and `MaxNormAlignment` wherever a
batch's gradient norms are all equal); the tests check it.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_split.messages import Activations, Reply
from keras_split.partition import io_structure
from keras_split.roles import MessageHandler
from keras_split.transport import Transport

_DISTRIBUTIONS = ("gaussian", "laplace")


def _entropy(seed: int | None) -> int:
    """A root seed: `seed` itself, or fresh entropy when it is None."""
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer or None, received {seed!r}.")
    return int(seed)


def _step_rng(root: int, step: int) -> np.random.Generator:
    # Noise drawn from (root seed, step): nothing is kept between calls, a
    # retried step draws the same noise (so a retry releases nothing new), and
    # a restored server draws what it would have drawn.
    return np.random.default_rng([root, max(int(step), 0)])


# -- 1. activations: clipping and noise on the client --------------------------


@keras.saving.register_keras_serializable(package="keras_split")
class CutNoise(keras.layers.Layer):
    """Clips each sample's cut activations to a norm and adds Gaussian or Laplace noise.

    Append it to the client half (`add_cut_noise`) so that what crosses the
    cut is the noisy value; the client's backward pass runs through the
    clipping exactly (it is part of the client's graph). With the defaults
    (no clipping, no noise) it is the identity and training is plain split
    training, bit for bit.

    **This is NOT differential privacy.** No privacy accounting is done and
    none is claimed: the noise is not calibrated to a privacy budget, the same
    input is released again every epoch and at inference, and the labels, the
    cut gradients and the trained client weights are not covered. Treat it as
    an empirical defence and measure it with the attacks
    (`keras_split.privacy.attacks`: distance correlation, model inversion).

    Args:
        clip_norm: the largest L2 norm a sample's activations may have (over
            all its non-batch axes); larger ones are scaled down to it. None:
            no clipping. Clipping bounds the noise-to-signal ratio: without
            it the client could outgrow any fixed noise by scaling up.
        scale: the noise scale: the standard deviation of the Gaussian, or
            the scale `b` of the Laplace (whose standard deviation is
            `b * sqrt(2)`). 0 adds no noise.
        distribution: "gaussian" or "laplace".
        at_inference: also add noise outside training (evaluate, predict):
            those activations cross the cut too. False behaves like
            `keras.layers.GaussianNoise` (training only).
        seed: seeds the layer's `keras.random.SeedGenerator`.

    Example:

    ```python
    noisy = keras_split.privacy.defences.add_cut_noise(split.client, clip_norm=10.0,
                                                       scale=0.5)
    defended = keras_split.SplitModel(client=noisy, server=split.server)
    defended.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    ```
    """

    def __init__(self, clip_norm: float | None = None, scale: float = 0.0,
                 distribution: str = "gaussian", at_inference: bool = True,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"`clip_norm` must be positive or None, received {clip_norm!r}.")
        if not scale >= 0 or not math.isfinite(scale):
            raise ValueError(f"`scale` must be a finite number >= 0, received {scale!r}.")
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(f"`distribution` must be one of {_DISTRIBUTIONS}, received "
                             f"{distribution!r}.")
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.scale = float(scale)
        self.distribution = distribution
        self.at_inference = bool(at_inference)
        self.seed = seed
        # Created only when there is noise to draw: an identity layer creates
        # no seed state, so the off setting is plain training exactly.
        self.seed_generator = keras.random.SeedGenerator(seed) if self.scale > 0 else None
        self.supports_masking = True

    def call(self, inputs, training=None):
        x = inputs
        if self.clip_norm is not None:
            axes = tuple(range(1, len(x.shape)))
            norm = ops.sqrt(ops.sum(ops.square(x), axis=axes, keepdims=True))
            x = x * ops.minimum(1.0, self.clip_norm / ops.maximum(norm, 1e-12))
        if self.seed_generator is None or not (training or self.at_inference):
            return x
        if self.distribution == "gaussian":
            noise = keras.random.normal(ops.shape(x), stddev=self.scale, dtype=x.dtype,
                                        seed=self.seed_generator)
        else:
            # Inverse CDF of the Laplace distribution on u ~ U(-1/2, 1/2).
            u = keras.random.uniform(ops.shape(x), minval=-0.5, maxval=0.5, dtype=x.dtype,
                                     seed=self.seed_generator)
            noise = -self.scale * ops.sign(u) * ops.log(ops.maximum(1.0 - 2.0 * ops.abs(u),
                                                                    1e-12))
        return x + noise

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "clip_norm": self.clip_norm, "scale": self.scale,
                "distribution": self.distribution, "at_inference": self.at_inference,
                "seed": self.seed}


def add_cut_noise(client: keras.Model, clip_norm: float | None = None, scale: float = 0.0,
                  distribution: str = "gaussian", at_inference: bool = True,
                  seed: int | None = None) -> keras.Model:
    """The client half with a `CutNoise` layer on each of its outputs (the cut).

    Args:
        client: the client half, e.g. `split.client`. Its layers are shared,
            not copied: training the new model trains them.
        clip_norm, scale, distribution, at_inference, seed: as in `CutNoise`
            (each cut tensor gets its own layer, seeded `seed + i`).

    Returns:
        A `keras.Model` with the same inputs and noisy outputs; pair it with
        the server half in a `keras_split.SplitModel`.
    """
    # The inputs in the client's own structure (a tensor, a list or a dict),
    # so the data that fits the client fits the noisy one.
    inputs, _ = io_structure(client)
    noisy = [CutNoise(clip_norm, scale, distribution, at_inference,
                      None if seed is None else seed + i, name=f"cut_noise_{i}")(out)
             for i, out in enumerate(client.outputs)]
    return keras.Model(inputs, noisy if len(noisy) > 1 else noisy[0],
                       name=f"{client.name}_noisy")


# -- 2. labels, server side: perturbing the cut gradients --------------------------


def _per_sample(gradients: tuple[np.ndarray, ...]) -> np.ndarray:
    """Each sample's gradient over all cut tensors, as one row (float64)."""
    return np.concatenate([np.asarray(g, np.float64).reshape(len(g), -1) for g in gradients],
                          axis=1)


def _unflatten(rows: np.ndarray, like: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    out, start = [], 0
    for g in like:
        size = int(np.prod(g.shape[1:], dtype=np.int64))
        out.append(rows[:, start:start + size].reshape(g.shape).astype(g.dtype))
        start += size
    return tuple(out)


class GradientPerturbation:
    """A server role that perturbs the cut gradients of its inner role's replies.

    The wrapper is what the client talks to: it hands each message to the
    inner role (a `ServerRole`, which trains on the true gradients), then
    replaces the reply's cut gradients by `perturb(...)` before they leave
    the server. Only the client's half sees perturbed gradients; the server's
    own update is unchanged. Replies without gradients (evaluate, predict)
    pass unchanged.

    The server's cut gradient for a batch is the gradient of the batch's mean
    loss, so row `i` is sample `i`'s own gradient divided by the batch size
    (no other sample enters it unless the server's half mixes samples, as
    BatchNormalization does): the defences perturb row by row.

    Subclasses implement `perturb(rows, labels, rng) -> rows`. The noise is
    drawn from a generator seeded by (seed, step): the wrapper keeps nothing
    between steps, a retried step gets the same noise, and `state`/`restore`
    are the inner role's.

    Args:
        role: the inner `keras_split.roles.MessageHandler` (a `ServerRole`).
        seed: the root seed of the noise; None draws fresh entropy.
    """

    def __init__(self, role: MessageHandler, seed: int | None = None):
        if not isinstance(role, MessageHandler):
            raise TypeError("`role` must be a keras_split.roles.MessageHandler (`handle`, "
                            f"`state`, `restore`), such as a ServerRole; received "
                            f"{type(role).__name__}.")
        self.role = role
        self.seed = seed
        self._root = _entropy(seed)

    def perturb(self, rows: np.ndarray, labels, rng: np.random.Generator) -> np.ndarray:
        """The rows (one per sample, float64) as the client will receive them."""
        raise NotImplementedError

    def handle(self, message: Activations) -> Reply:
        reply = self.role.handle(message)
        if message.mode != "train" or not reply.gradients:
            return reply
        rows = self.perturb(_per_sample(reply.gradients), message.labels,
                            _step_rng(self._root, message.step))
        return dataclasses.replace(reply, gradients=_unflatten(rows, reply.gradients))

    def state(self) -> dict[str, np.ndarray]:
        return self.role.state()

    def restore(self, arrays: dict[str, np.ndarray], path) -> None:
        self.role.restore(arrays, path)


class MaxNormAlignment(GradientPerturbation):
    """Li et al.'s max-norm heuristic: each gradient's expected norm becomes the batch's largest.

    The norm attack reads labels from cut-gradient norms (on an imbalanced
    binary task the minority class's gradients are larger). For each sample
    `j` of a batch, with `g_max` the largest per-sample gradient norm in the
    batch, the reply carries

        g̃_j = g_j * (1 + σ_j * ξ_j),   ξ_j ~ N(0, 1),   σ_j = sqrt(‖g_max‖² / ‖g_j‖² - 1),

    so that `E‖g̃_j‖² = ‖g_j‖² (1 + σ_j²) = ‖g_max‖²` for every sample: in
    expectation every sample looks like the batch's largest. The noise is
    along the gradient itself (scalar, per sample), so `E g̃_j = g_j` and
    the client's update is unbiased. This follows the authors' code
    (`gradient_masking` in OscarcarLi/label-protection,
    `custom_gradients_masking.py`), which the paper's "max norm" heuristic
    describes; a sample whose norm is 0 stays 0 (its σ is undefined; the
    authors' 1e-32 guard gives a zero gradient too).

    It targets the norm attack. The direction attack is weakened only
    through sign flips (`1 + σ_j ξ_j < 0`), which happen often for small
    gradients and rarely for those near the maximum.

    Args:
        role: the inner `ServerRole` (or any `MessageHandler`).
        seed: the root seed of the noise.

    Example:

    ```python
    role = MaxNormAlignment(ServerRole(split.server, "adam", loss, ["accuracy"]), seed=0)
    split.compile(optimizer="adam", transport=InProcessTransport(role))
    # or, over the network: SplitServer(split.server, role=role, tokens=...)
    ```

    Reference:
        Oscar Li, Jiankai Sun, Xin Yang, Weihao Gao, Hongyi Zhang, Junyuan Xie,
        Virginia Smith, Chong Wang. "Label Leakage and Protection in Two-party
        Split Learning". ICLR 2022. https://arxiv.org/abs/2102.08504
    """

    def perturb(self, rows, labels, rng):
        norms = np.linalg.norm(rows, axis=1)
        top = norms.max() if len(norms) else 0.0
        sigma = np.zeros_like(norms)
        nonzero = norms > 0
        sigma[nonzero] = np.sqrt(np.maximum(top**2 / norms[nonzero] ** 2 - 1.0, 0.0))
        xi = rng.standard_normal(len(rows))
        return rows * (1.0 + sigma * xi)[:, None]


class GaussianGradientNoise(GradientPerturbation):
    """Isotropic Gaussian noise on each sample's cut gradient, scaled to the batch's largest.

    Each row gets `N(0, s² I)` noise with `s = ratio * ‖g_max‖ / sqrt(d)`
    (`d` the number of values per sample, `g_max` the batch's largest
    per-sample gradient), so the noise's expected norm is about `ratio`
    times the largest gradient's: Li et al.'s isotropic Gaussian baseline
    ("iso"), as in the authors' `gradient_gaussian_noise_masking`. With
    `ratio=0` it is plain split training, bit for bit.

    Args:
        role: the inner `ServerRole` (or any `MessageHandler`).
        ratio: the noise's expected norm relative to the batch's largest
            gradient norm (>= 0).
        seed: the root seed of the noise.

    Reference:
        Li et al., "Label Leakage and Protection in Two-party Split Learning",
        ICLR 2022 (see `MaxNormAlignment`).
    """

    def __init__(self, role: MessageHandler, ratio: float = 1.0, seed: int | None = None):
        if not ratio >= 0 or not math.isfinite(ratio):
            raise ValueError(f"`ratio` must be a finite number >= 0, received {ratio!r}.")
        super().__init__(role, seed)
        self.ratio = float(ratio)

    def perturb(self, rows, labels, rng):
        if self.ratio == 0 or rows.size == 0:
            return rows
        top = np.linalg.norm(rows, axis=1).max()
        std = self.ratio * top / math.sqrt(rows.shape[1])
        return rows + rng.normal(0.0, std, size=rows.shape)


# -- 3. labels, client side: randomized response -------------------------------------


def keep_probability(epsilon: float, num_classes: int) -> float:
    """The probability that randomized response keeps a label: e^ε / (e^ε + K - 1)."""
    if epsilon == math.inf:
        return 1.0
    return math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)


def randomized_response(labels, epsilon: float, num_classes: int = 2,
                        rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Labels randomized for epsilon-label differential privacy (randomized response, RR_ε).

    Each label `y` is kept with probability `e^ε / (e^ε + K - 1)` and
    otherwise replaced by one of the other `K - 1` classes, each with
    probability `1 / (e^ε + K - 1)`. For a binary task (`K = 2`) a label is
    flipped with probability `1 / (e^ε + 1)`.

    **Guarantee: ε-label-DP.** For any two labels `y, y'` and any output
    `ỹ`, `P(ỹ | y) / P(ỹ | y') <= e^ε`, so whatever is computed from the
    randomized labels (the whole training, any number of epochs: it is
    post-processing) is ε-differentially private with respect to each
    sample's label. Randomize the dataset once, before `fit`, for that
    guarantee; randomizing again for each release spends ε again each time
    (see `RandomizedLabels`). The inputs are not protected.

    Args:
        labels: integer class indices in `[0, num_classes)` (any shape), or
            one-hot rows (last axis of length `num_classes`).
        epsilon: the privacy parameter (> 0; `math.inf` keeps every label).
        num_classes: K, the number of classes (>= 2).
        rng: a numpy `Generator`, or a seed for one.

    Returns:
        An array of the same shape and dtype.

    Example:

    ```python
    y_private = randomized_response(y_train, epsilon=2.0, num_classes=2, rng=0)
    split.fit(x_train, y_private, epochs=5)   # 2.0-label-DP
    ```

    Reference:
        S. L. Warner, "Randomized Response", JASA 1965; B. Ghazi, N. Golowich,
        R. Kumar, P. Manurangsi, C. Zhang, "Deep Learning with Label
        Differential Privacy", NeurIPS 2021 (RR as a label-DP mechanism).
    """
    if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 2):
        raise ValueError(f"`num_classes` must be an integer >= 2, received {num_classes!r}.")
    if not epsilon > 0:
        raise ValueError(f"`epsilon` must be positive (math.inf keeps every label), received "
                         f"{epsilon!r}.")
    array, one_hot, classes = class_labels(labels, num_classes, "`labels` must be")
    if epsilon == math.inf:
        return array.copy()
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    flip = rng.random(classes.shape) >= keep_probability(epsilon, num_classes)
    noisy = np.where(flip, other_classes(classes, num_classes, rng), classes)
    return like_labels(noisy, array, one_hot, num_classes)


def class_labels(labels, num_classes: int, need: str) -> tuple[np.ndarray, bool, np.ndarray]:
    """(the labels as an array, whether they are one-hot, their class indices as
    int64), or a ValueError starting with `need` when they are not classes."""
    array = np.asarray(labels)
    one_hot = array.ndim >= 2 and array.shape[-1] == num_classes
    classes = np.argmax(array, axis=-1) if one_hot else array
    if classes.size and (np.any(classes != np.round(classes)) or classes.min() < 0
                         or classes.max() >= num_classes):
        raise ValueError(f"{need} class indices in [0, {num_classes}) or one-hot "
                         f"rows of length {num_classes}; received values from "
                         f"{classes.min()} to {classes.max()}.")
    return array, one_hot, classes.astype(np.int64)


def other_classes(classes: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Another class for each, uniformly: a shift by 1..K-1 modulo K."""
    return (classes + rng.integers(1, num_classes, size=classes.shape)) % num_classes


def like_labels(classes: np.ndarray, array: np.ndarray, one_hot: bool,
                num_classes: int) -> np.ndarray:
    """Class indices back in the labels' own format and dtype."""
    if one_hot:
        return np.eye(num_classes, dtype=array.dtype)[classes]
    return classes.astype(array.dtype)


class RandomizedLabels(Transport):
    """Sends every message's labels through randomized response (client side).

    Wrap the client's transport; the server receives only randomized labels
    (and computes its loss, metrics and cut gradients from them). Labels are
    randomized in "train" and "evaluate" messages alike (both carry labels
    across): evaluation metrics are then measured on randomized labels.

    **Guarantee**: each message is ε-label-DP for the labels in it (see
    `randomized_response`). A sample sent again (every epoch, each
    evaluation) is randomized afresh, so by basic composition a label sent
    in `k` messages has `k * ε`. For ε over the whole training, randomize
    the dataset once with `randomized_response` and use a plain transport.
    The noise is drawn from (seed, step): a retried step sends the same
    labels again, releasing nothing new.

    Args:
        inner: the transport to the server.
        epsilon: the privacy parameter per message (`math.inf`: labels pass
            unchanged, plain split training bit for bit).
        num_classes: K (see `randomized_response`).
        seed: the root seed; None draws fresh entropy.
    """

    def __init__(self, inner: Transport, epsilon: float, num_classes: int = 2,
                 seed: int | None = None):
        super().__init__()
        randomized_response(np.zeros(0, np.int64), epsilon, num_classes)  # checks the args
        self.inner, self.epsilon, self.num_classes = inner, epsilon, num_classes
        self.seed = seed
        self._root = _entropy(seed)
        self.bytes = inner.bytes  # count what really crosses

    def _exchange(self, message: Activations) -> tuple[Reply, int, int]:
        if message.labels is not None and self.epsilon != math.inf:
            rng = _step_rng(self._root, message.step)
            labels = keras.tree.map_structure(
                lambda y: randomized_response(y, self.epsilon, self.num_classes, rng),
                message.labels)
            message = dataclasses.replace(message, labels=labels)
        return self.inner.exchange(message), 0, 0  # the inner transport counted the bytes
