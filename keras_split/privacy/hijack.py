"""Feature-space hijacking, and a client-side detector for it.

A malicious server need not wait for leaks: it controls the gradients it
returns, so it can train the client's layers to map inputs into a feature
space it already knows how to invert. This is the feature-space hijacking
attack (FSHA; D. Pasquini, G. Ateniese, M. Bernaschi, "Unleashing the tiger:
inference attacks on split learning", ACM CCS 2021). The server holds public
data of the same kind as the client's and trains three networks of its own:

- a *pilot* encoder from inputs to the cut's shape, and a *decoder* that
  inverts it (an autoencoder on the public data);
- a *discriminator* that tells the pilot's features (label 1) from the
  client's cut activations (label 0).

Instead of the gradient of a task loss, it returns to the client the
gradient that makes the discriminator take the client's activations for the
pilot's. The client's layers drift into the pilot's feature space, and the
decoder then reconstructs the client's private inputs from what they send.
Distance correlation (NoPeek) does not stop this: the server chooses the
features.

`HijackingServer` is that server (a `MessageHandler`: it drops in wherever a
`ServerRole` does, in process or behind `keras-split serve`-like code), for
measuring the attack and testing defences; `feature_space_hijacking` runs it
against a client and reports the reconstruction error over steps.

`HijackDetector` is the defence, in the spirit of SplitGuard (E. Erdogan,
A. Küpçü, A. E. Çiçek, "SplitGuard: detecting and mitigating
training-hijacking attacks in split learning", WPES 2022): now and then the
client sends a batch again with its labels replaced by wrong ones and
compares the gradient it gets back with the one for the true labels. An
honest server's gradient depends on the labels (for cross-entropy, the
gradient at the logits is `p - y`: changing `y` turns it around); a
hijacking server ignores them, so both gradients agree. The detector scores
each check by the mean per-sample cosine between the two gradients and flags
the server when a score exceeds a threshold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from keras_split.messages import Activations, Reply
from keras_split.privacy.attacks import (
    InversionResult,
    _cut_activations,
    _pyplot,
    _rows,
    inversion_decoder,
)
from keras_split.privacy.defences import (
    _entropy,
    _step_rng,
    class_labels,
    like_labels,
    other_classes,
)
from keras_split.transport import InProcessTransport, Transport


def _discriminator(cut_shape: Sequence[int]) -> keras.Model:
    layers = keras.layers
    z = keras.Input(tuple(cut_shape), name="cut")
    x = z
    if len(cut_shape) == 3:
        x = layers.Conv2D(64, 3, padding="same")(x)
        x = layers.LeakyReLU(0.2)(x)
        x = layers.Conv2D(64, 3, strides=2, padding="same")(x)
        x = layers.LeakyReLU(0.2)(x)
    x = layers.Flatten()(x) if len(cut_shape) > 1 else x
    x = layers.Dense(128)(x)
    x = layers.LeakyReLU(0.2)(x)
    return keras.Model(z, layers.Dense(1)(x), name="hijack_discriminator")


class HijackingServer:
    """A malicious server half that hijacks the client's features (FSHA).

    It answers "train" messages with the gradient of the Wasserstein
    generator loss `-mean(D(z))` at the client's cut activations `z`, after
    one training step of its own: the pilot and decoder on a batch of public
    data (mean squared reconstruction error), and the discriminator on the
    pilot's features (real) against `z` (fake). Labels, when sent, are
    ignored. "evaluate" messages get the same loss in their logs and change
    nothing; "predict" messages are refused (it has no task model).

    A simulation for measuring attacks and defences: use it to see what a
    malicious server could learn from a client, never as a server.

    Args:
        x_public: the attacker's own data, of the same kind as the client's
            (same input shape); scaled to [0, 1] by its min and max.
        pilot: a model from inputs to the cut's shape. By default a fresh
            copy of the client's architecture (`keras.models.clone_model`),
            as when the server supplies the model; pass `client=` for it.
        client: the client half, whose architecture the default pilot copies.
        knows_weights: the default pilot also starts from the client's
            current weights (a server that supplied the initial model knows
            them): the client's features start in the pilot's space, and the
            attack only has to keep them there.
        decoder: from the cut's shape to inputs in [0, 1]; default
            `inversion_decoder`.
        discriminator: from the cut's shape to one logit; default a small
            convolutional (or dense, for flat cuts) network.
        learning_rate: Adam's, for the pilot and the decoder (and the
            discriminator unless `discriminator_learning_rate` is given).
            The default, 1e-3, is the stronger attacker on the chest X-rays
            (BENCHMARKS.md): at 1e-4 the autoencoder itself reconstructs
            barely better than the mean image within 1,500 steps.
        discriminator_learning_rate: Adam's for the discriminator (the WGAN
            critic); default `learning_rate`.
        gradient_penalty: the weight of the critic's gradient penalty.
        seed: the order of the public batches.
    """

    def __init__(self, x_public, *, client: keras.Model | None = None,
                 pilot: keras.Model | None = None, decoder: keras.Model | None = None,
                 discriminator: keras.Model | None = None, learning_rate: float = 1e-3,
                 discriminator_learning_rate: float | None = None,
                 gradient_penalty: float = 10.0, knows_weights: bool = False,
                 seed: int | None = 0):
        x_public = np.asarray(x_public)
        if x_public.ndim < 2 or len(x_public) == 0:
            raise ValueError("`x_public` must be a batch of inputs (samples first); received "
                             f"an array of shape {x_public.shape}.")
        if pilot is None:
            if client is None:
                raise ValueError("Pass `pilot=` (a model from inputs to the cut's shape) or "
                                 "`client=` (the client half, whose architecture the pilot "
                                 "copies).")
            pilot = keras.models.clone_model(client)
            if knows_weights:
                pilot.set_weights(client.get_weights())
        if len(pilot.outputs) != 1:
            raise ValueError("The hijacking server attacks single-tensor cuts; the pilot has "
                             f"{len(pilot.outputs)} outputs.")
        self.cut_shape = tuple(int(d) for d in pilot.outputs[0].shape[1:])
        low, high = float(x_public.min()), float(x_public.max())
        self.low, self.span = low, (high - low if high > low else 1.0)
        self.x_public = x_public
        targets = self.scale(x_public)
        self.pilot = pilot
        self.decoder = decoder or inversion_decoder(self.cut_shape, targets.shape[1:])
        self.discriminator = discriminator or _discriminator(self.cut_shape)
        self.gradient_penalty = gradient_penalty
        self.optimizers = [keras.optimizers.Adam(learning_rate),
                           keras.optimizers.Adam(discriminator_learning_rate or learning_rate)]
        self._rng = np.random.default_rng(seed)
        self._order: np.ndarray = np.zeros(0, np.int64)
        self.steps = 0
        self._step_fn = tf.function(self._step, reduce_retracing=True)
        self._loss_fn = tf.function(self._client_loss, reduce_retracing=True)

    def scale(self, x) -> np.ndarray:
        """Inputs on the [0, 1] scale the decoder reconstructs (channels last)."""
        t = ((np.asarray(x, np.float32) - self.low) / self.span).astype(np.float32)
        return t[..., None] if t.ndim == 3 else t

    def reconstruct(self, activations) -> np.ndarray:
        """The decoder's reconstruction of inputs from cut activations."""
        z = np.asarray(activations, np.float32)
        return np.concatenate([np.asarray(self.decoder(z[i:i + 256], training=False))
                               for i in range(0, len(z), 256)])

    def _public_batch(self, n: int) -> np.ndarray:
        if len(self._order) < n:
            self._order = np.concatenate([self._order,
                                          self._rng.permutation(len(self.x_public))])
        index, self._order = self._order[:n], self._order[n:]
        return self.x_public[index]

    def _client_loss(self, z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = -tf.reduce_mean(self.discriminator(z, training=False))
        return loss, tape.gradient(loss, z)

    def _step(self, z, x_pub, t_pub):
        pilot_decoder = self.pilot.trainable_variables + self.decoder.trainable_variables
        with tf.GradientTape() as tape:
            features = self.pilot(x_pub, training=True)
            rebuilt = self.decoder(features, training=True)
            autoencoder = tf.reduce_mean(tf.square(rebuilt - t_pub))
        self.optimizers[0].apply(tape.gradient(autoencoder, pilot_decoder), pilot_decoder)
        loss, gradient = self._client_loss(z)
        real = tf.stop_gradient(features)
        # WGAN-GP (Gulrajani et al. 2017), as in FSHA: the critic's gradient
        # norm is pushed to 1 on points between real and fake features.
        share = tf.random.uniform([tf.shape(z)[0]] + [1] * (len(self.cut_shape)), 0.0, 1.0)
        between = real + share * (z - real)
        weights = self.discriminator.trainable_variables
        with tf.GradientTape() as tape:
            with tf.GradientTape() as inner:
                inner.watch(between)
                scores = self.discriminator(between, training=True)
            slopes = tf.reshape(inner.gradient(scores, between), [tf.shape(z)[0], -1])
            penalty = tf.reduce_mean(tf.square(tf.norm(slopes, axis=1) - 1.0))
            critic = (tf.reduce_mean(self.discriminator(z, training=True))
                      - tf.reduce_mean(self.discriminator(real, training=True)))
            total = critic + self.gradient_penalty * penalty
        self.optimizers[1].apply(tape.gradient(total, weights), weights)
        return loss, gradient, autoencoder, critic

    def handle(self, message: Activations) -> Reply:
        if len(message.tensors) != 1:
            raise ValueError("The hijacking server attacks single-tensor cuts; received "
                             f"{len(message.tensors)} cut tensors.")
        z = tf.constant(np.asarray(message.tensors[0], np.float32))
        if tuple(z.shape[1:]) != self.cut_shape:
            raise ValueError(f"Cut activations of shape {tuple(z.shape[1:])} per sample do not "
                             f"match the pilot's output {self.cut_shape}.")
        if message.mode == "predict":
            raise ValueError("The hijacking server has no task model; it answers 'train' and "
                             "'evaluate' messages only.")
        if message.mode == "evaluate":
            loss, _ = self._loss_fn(z)
            return Reply(step=message.step, logs={"loss": float(loss)})
        x_pub = self._public_batch(len(z))
        loss, gradient, autoencoder, critic = self._step_fn(
            z, tf.constant(x_pub), tf.constant(self.scale(x_pub)))
        self.steps += 1
        return Reply(step=message.step, gradients=(np.asarray(gradient),),
                     logs={"loss": float(loss), "autoencoder_loss": float(autoencoder),
                           "discriminator_loss": float(critic)})

    def state(self) -> dict[str, np.ndarray]:
        arrays = {}
        for name, model in [("pilot", self.pilot), ("decoder", self.decoder),
                            ("discriminator", self.discriminator)]:
            for i, w in enumerate(model.get_weights()):
                arrays[f"{name}/{i}"] = w
        return arrays

    def restore(self, arrays: dict[str, np.ndarray], path=None) -> None:
        for name, model in [("pilot", self.pilot), ("decoder", self.decoder),
                            ("discriminator", self.discriminator)]:
            model.set_weights([arrays[f"{name}/{i}"] for i in range(len(model.get_weights()))])


# -- the detector ------------------------------------------------------------------------


class HijackDetected(RuntimeError):
    """The hijack detector flagged the server; the step's gradient was not applied."""


@dataclass
class Check:
    """One detector check: the client's step and the mean per-sample cosine between
    the gradients for true and for wrong labels (near -1 or low: the labels matter,
    an honest server; near 1: the server ignores them)."""

    step: int
    score: float
    flagged: bool


def _wrong_labels(labels, num_classes: int, rng: np.random.Generator):
    array, one_hot, classes = class_labels(
        labels, num_classes, "The hijack detector needs (set `num_classes`)")
    return like_labels(other_classes(classes, num_classes, rng), array, one_hot, num_classes)


def gradient_agreement(true_gradients, wrong_gradients) -> float:
    """Mean per-sample cosine between two replies' cut gradients for one batch
    (samples with a zero gradient in either are left out; NaN when all are)."""
    a, b = _rows(true_gradients), _rows(wrong_gradients)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    keep = norms > 0
    if not np.any(keep):
        return math.nan
    return float(np.mean(np.sum(a[keep] * b[keep], axis=1) / norms[keep]))


class HijackDetector(Transport):
    """Flags a server whose cut gradients do not depend on the labels (client side).

    Wrap the client's transport (vanilla split learning: the server holds
    the loss and receives the labels). On a training step chosen at random
    (`probability`; the first training step after `warmup` always), the
    detector sends the same cut activations once more as the next step,
    with every label replaced by another class, and compares the two
    replies' gradients (`gradient_agreement`). An honest server's two
    gradients disagree (a binary cross-entropy head turns them around,
    score near -1); a server that ignores the labels returns nearly the
    same gradient twice (score near 1). A score above `threshold` flags the
    server: by default (`on_detect="raise"`) a `HijackDetected` error stops
    training before the client applies that step's gradient.

    Costs and limits, stated plainly:
    - each check is one extra training step on the server, on wrong labels
      (an honest server learns from them; its running metrics include them);
      at `probability=0.05` that is 5 % more server steps and traffic;
    - the two messages of a check go out as consecutive steps, so the
      detector numbers steps on the wire `2 * step` and `2 * step + 1`
      (replies are mapped back): a session resumed from a checkpoint must
      use the detector as before;
    - it needs labels to cross (not U-shaped training, where the client
      computes the loss and can check its own gradients) and class labels;
    - an adaptive server that notices the repeated activations can answer
      consistently; the checks are not hidden from it.

    Args:
        inner: the transport to the server.
        num_classes: classes of the labels (the wrong labels are drawn from them).
        probability: the chance of a check on each training step.
        warmup: training steps before the first check.
        threshold: the score above which the server is flagged.
        on_detect: "raise", "warn" (a warning; training goes on), or a
            function called with the `Check`.
        seed: the root of the check schedule and the wrong labels; None draws
            fresh entropy (a server cannot predict the checks).

    Attributes:
        checks: every `Check` so far.
        detected_at: the client step of the first flag, or None.
    """

    def __init__(self, inner: Transport, num_classes: int = 2, *, probability: float = 0.05,
                 warmup: int = 0, threshold: float = 0.5,
                 on_detect: str | Callable[[Check], None] = "raise", seed: int | None = None):
        super().__init__()
        if not isinstance(inner, Transport):
            raise TypeError(f"`inner` must be a keras_split.Transport; received "
                            f"{type(inner).__name__}.")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2; received {num_classes!r}.")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"`probability` must be in [0, 1]; received {probability}.")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` is a cosine, in [-1, 1]; received {threshold}.")
        if on_detect not in ("raise", "warn") and not callable(on_detect):
            raise ValueError("`on_detect` must be 'raise', 'warn' or a function of the Check; "
                             f"received {on_detect!r}.")
        self.inner, self.num_classes = inner, num_classes
        self.probability, self.warmup, self.threshold = probability, warmup, threshold
        self.on_detect = on_detect
        self._root = _entropy(seed)
        self.bytes = inner.bytes
        self.checks: list[Check] = []
        self.detected_at: int | None = None
        self._train_steps = 0

    def _due(self, step: int) -> bool:
        self._train_steps += 1
        if self._train_steps <= self.warmup:
            return False
        if not self.checks:
            return True
        return bool(_step_rng(self._root, step).random() < self.probability)

    def _exchange(self, message: Activations) -> tuple[Reply, int, int]:
        outgoing = dataclasses.replace(message, step=2 * message.step)
        reply = dataclasses.replace(self.inner.exchange(outgoing), step=message.step)
        if message.mode != "train" or message.labels is None or not self._due(message.step):
            return reply, 0, 0
        rng = _step_rng(self._root ^ 0x5EED, message.step)
        wrong = keras.tree.map_structure(
            lambda y: _wrong_labels(y, self.num_classes, rng), message.labels)
        probe = dataclasses.replace(message, step=2 * message.step + 1, labels=wrong,
                                    reset_metrics=False)
        answer = self.inner.exchange(probe)
        score = gradient_agreement(reply.gradients, answer.gradients)
        flagged = bool(score > self.threshold)
        check = Check(step=message.step, score=score, flagged=flagged)
        self.checks.append(check)
        if flagged:
            if self.detected_at is None:
                self.detected_at = message.step
            if self.on_detect == "raise":
                raise HijackDetected(
                    f"The server's cut gradients at step {message.step} do not depend on the "
                    f"labels (agreement {score:.3f} between true and wrong labels, threshold "
                    f"{self.threshold}): it may be hijacking the client's features. The step "
                    "was not applied. Stop training with this server, or pass "
                    "on_detect='warn' to keep going.")
            if self.on_detect == "warn":
                import warnings
                warnings.warn(f"Hijack detector: step {message.step}, agreement {score:.3f} "
                              f"above {self.threshold}.", stacklevel=2)
            elif callable(self.on_detect):
                self.on_detect(check)
        return reply, 0, 0

    def close(self) -> None:
        self.inner.close()


# -- the attack, run against a client -------------------------------------------------------


@dataclass
class HijackResult:
    """The hijacking server's reconstruction error over the client's training steps.

    Attributes:
        steps, mse: the client step and the reconstruction MSE (on [0, 1]
            inputs) of held-out private inputs from their cut activations.
        baseline_mse: the mean public image's MSE on the same inputs (the
            attacker's best guess without the client).
        halved_at: the first measured step at which the MSE is at most half
            its value before training (None if never).
        below_baseline_at: the first measured step at which the MSE is below
            `baseline_mse` (None if never).
        detected_at: the detector's first flag (None if it never flagged or
            no detector ran); training stopped there when it raises.
        checks: the detector's checks.
        originals, reconstructions: a few held-out inputs and their final
            reconstructions (for `plot`).
    """

    steps: list[int]
    mse: list[float]
    baseline_mse: float
    halved_at: int | None
    below_baseline_at: int | None
    detected_at: int | None
    checks: list[Check] = field(default_factory=list)
    originals: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    reconstructions: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def plot(self):
        """The MSE over steps, the baseline, and the detection step. Returns the figure."""
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot(self.steps, self.mse, label="hijacker's reconstruction MSE")
        axis.axhline(self.baseline_mse, color="gray", linestyle="--",
                     label="mean public image")
        if self.detected_at is not None:
            axis.axvline(self.detected_at, color="red", linestyle=":",
                         label=f"detected (step {self.detected_at})")
        axis.set_xlabel("client training step")
        axis.set_ylabel("MSE")
        axis.legend()
        figure.tight_layout()
        return figure

    def plot_reconstructions(self, n: int = 8):
        """Held-out originals above the hijacker's last reconstructions of them. Returns
        the figure."""
        figure = InversionResult(
            mse=self.mse[-1], ssim=None, baseline_mse=self.baseline_mse, baseline_ssim=None,
            originals=self.originals, reconstructions=self.reconstructions).plot(n)
        figure.suptitle(f"Feature-space hijacking, after {self.steps[-1]} client steps: MSE "
                        f"{self.mse[-1]:.4f} (mean public image {self.baseline_mse:.4f})")
        return figure


def feature_space_hijacking(client: keras.Model, x_private, x_public, x_eval=None, *,
                            steps: int = 500, batch_size: int = 64, optimizer=None,
                            detector: dict | None = None, eval_every: int = 25,
                            server: HijackingServer | None = None, labels=None,
                            knows_weights: bool = False, seed: int | None = 0,
                            examples: int = 8) -> HijackResult:
    """Train `client` against a `HijackingServer` and track what it can reconstruct.

    The client trains on `x_private` (batches of `batch_size`, reshuffled each
    pass) with `optimizer` (default Adam 1e-3), applying the gradients the
    hijacking server returns, as an unsuspecting client would. Every
    `eval_every` steps the reconstruction MSE of `x_eval` (held-out private
    inputs; default the first 256 of `x_private`) is measured.

    Args:
        client: the client half (trained in place; pass a copy to keep yours).
        x_private, x_public: the client's data and the attacker's.
        x_eval: held-out private inputs to reconstruct.
        steps, batch_size, optimizer: the client's training.
        detector: keyword arguments of a `HijackDetector` to run on the
            client's link (None: no detector). The detector needs labels:
            `labels` (one per `x_private` row) are sent with each batch.
        eval_every: steps between MSE measurements.
        server: your own `HijackingServer` (default: one with the client's
            architecture as its pilot).
        knows_weights: the default server's pilot starts from the client's
            weights (a server that supplied the model); see `HijackingServer`.
        seed: batch order.
        examples: held-out reconstructions kept for plotting.

    Returns:
        A `HijackResult`.
    """
    from keras_split.split_model import SplitModel

    x_private = np.asarray(x_private)
    x_eval = x_private[:256] if x_eval is None else np.asarray(x_eval)
    if detector is not None and labels is None:
        raise ValueError("A detector needs the labels sent with each batch: pass `labels=`.")
    if server is not None and knows_weights:
        raise ValueError("`knows_weights` configures the default server; with your own "
                         "`server=`, build it with HijackingServer(..., knows_weights=True).")
    server = server or HijackingServer(x_public, client=client, knows_weights=knows_weights,
                                       seed=seed)
    targets = server.scale(x_eval)
    baseline = float(np.mean((server.scale(x_public).mean(axis=0) - targets) ** 2))

    def mse() -> float:
        return float(np.mean((server.reconstruct(_cut_activations(client, x_eval)) - targets)
                             ** 2))

    transport: Transport = InProcessTransport(server)
    watch = None
    if detector is not None:
        watch = HijackDetector(transport, **{"on_detect": "raise", **detector})
        transport = watch
    # The server half is never run: the SplitModel only carries the client and the link.
    dummy = keras.Sequential([keras.Input(server.cut_shape), keras.layers.Flatten()])
    split = SplitModel(client=client, server=dummy)
    split.compile(optimizer=optimizer or keras.optimizers.Adam(1e-3), transport=transport)
    y = np.zeros(len(x_private), np.int64) if labels is None else np.asarray(labels)
    record_steps, record_mse = [0], [mse()]
    stopped = False

    class Track(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = split._step
            if step % eval_every == 0 or step >= steps:
                record_steps.append(step)
                record_mse.append(mse())
            if step >= steps:
                split.stop_training = True

    per_epoch = math.ceil(len(x_private) / batch_size)
    keras.utils.set_random_seed(0 if seed is None else seed)
    try:
        split.fit(x_private, y, batch_size=batch_size,
                  epochs=math.ceil(steps / per_epoch), verbose=0, callbacks=[Track()])
    except HijackDetected:
        stopped = True
    applied = split._step - 1 if stopped else split._step  # a flagged step is not applied
    if record_steps[-1] != applied:
        record_steps.append(applied)
        record_mse.append(mse())
    first = record_mse[0]
    halved = next((s for s, m in zip(record_steps, record_mse, strict=True) if m <= first / 2),
                  None)
    below = next((s for s, m in zip(record_steps, record_mse, strict=True) if m < baseline),
                 None)
    n = min(examples, len(x_eval))
    return HijackResult(
        steps=record_steps, mse=record_mse, baseline_mse=baseline, halved_at=halved,
        below_baseline_at=below, detected_at=None if watch is None else watch.detected_at,
        checks=[] if watch is None else list(watch.checks), originals=targets[:n],
        reconstructions=server.reconstruct(_cut_activations(client, x_eval[:n])))


__all__ = ["Check", "HijackDetected", "HijackDetector", "HijackResult", "HijackingServer",
           "feature_space_hijacking", "gradient_agreement"]
