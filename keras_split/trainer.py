"""fit / evaluate / predict loops around the split step, with Keras callbacks.

The loops run on the party that holds the data (the client). They use Keras's
own `CallbackList`, `History` and progress bar, so callbacks behave as they do
with `keras.Model.fit`. The object given to callbacks as their `model` is the
`SplitModel` (or network client): it offers `stop_training`, `save`,
`save_weights`, `get_weights`/`set_weights`, `layers` and `optimizer` (the
client's), which is what the stock callbacks touch.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_split import protocol
from keras_split.batching import make_batches


class ClientLoss:
    """Running mean of the client's regularization loss, weighted by batch size.

    The server's running loss covers the data loss and its own layers'
    regularization; adding this mean gives the loss `keras.Model.fit` reports
    (a mean of sums equals the sum of the means under the same weights).

    `names` are logs the client itself reports per batch (its role's
    `log_names`, e.g. NoPeek's `nopeek_dcor`): `into` replaces each with its
    running mean, as the server's logs are running means.
    """

    def __init__(self, names=()):
        self.total = 0.0
        self.count = 0
        self.names = tuple(names)
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, value: float, x, logs=None) -> None:
        n = int(np.shape(keras.tree.flatten(x)[0])[0])
        self.total += value * n
        self.count += n
        for name in self.names:
            if logs and name in logs:
                self.totals[name] = self.totals.get(name, 0.0) + logs[name] * n
                self.counts[name] = self.counts.get(name, 0) + n

    def into(self, logs: dict) -> dict:
        if self.count and "loss" in logs:
            logs["loss"] = logs["loss"] + self.total / self.count
        for name, count in self.counts.items():
            if name in logs:
                logs[name] = self.totals[name] / count
        return logs


def _callbacks(owner, callbacks, verbose, epochs, steps):
    return keras.callbacks.CallbackList(
        callbacks,
        add_history=True,
        add_progbar=verbose != 0,
        verbose=verbose,
        epochs=epochs,
        steps=steps,
        model=owner,
    )


def _validation_batches(validation_data, batch_size):
    if validation_data is None:
        return None
    if isinstance(validation_data, tuple):
        if len(validation_data) not in (2, 3):
            raise ValueError(
                "`validation_data` must be (x_val, y_val), (x_val, y_val, sample_weight) or a "
                f"tf.data.Dataset; received a tuple of {len(validation_data)} items."
            )
        return make_batches(*validation_data, batch_size=batch_size, caller="fit")
    return make_batches(validation_data, batch_size=batch_size, caller="fit")


def _hold_out(x, y, sample_weight, validation_split):
    """Keras's rule: the last `validation_split` of the samples, before shuffling."""
    if not 0.0 < validation_split < 1.0:
        raise ValueError(
            f"`validation_split` must be in (0, 1), received {validation_split!r}."
        )
    if isinstance(x, tf.data.Dataset):
        raise ValueError(
            "`validation_split` is only supported for arrays; for a tf.data.Dataset pass "
            "`validation_data` instead."
        )
    x, y, sample_weight = (
        None if s is None else keras.tree.map_structure(np.asarray, s)
        for s in (x, y, sample_weight)
    )
    n = len(keras.tree.flatten(x)[0])
    split_at = int(np.floor(n * (1.0 - validation_split)))
    if split_at in (0, n):
        raise ValueError(
            f"`validation_split={validation_split}` leaves an empty training or validation set "
            f"out of {n} samples."
        )

    def part(structure, index):
        if structure is None:
            return None
        return keras.tree.map_structure(lambda a: a[index], structure)

    train = slice(0, split_at)
    held = slice(split_at, None)
    validation = (part(x, held), part(y, held))
    if sample_weight is not None:
        validation += (part(sample_weight, held),)
    return part(x, train), part(y, train), part(sample_weight, train), validation


def fit(owner, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
        validation_split=0.0, validation_data=None, shuffle=True, initial_epoch=0,
        sample_weight=None, validation_freq=1, seed=None):
    owner.require_compiled("fit")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be a positive integer, received {epochs!r}.")
    verbose = 1 if verbose == "auto" else verbose
    if validation_split and validation_data is None:
        x, y, sample_weight, validation_data = _hold_out(x, y, sample_weight, validation_split)
    batches = make_batches(x, y, sample_weight, batch_size, shuffle=shuffle, seed=seed)
    validation = _validation_batches(validation_data, batch_size)
    # What a resumed fit must agree on with the fit that wrote the checkpoint.
    fingerprint = {"steps": batches.steps, "batch_size": batch_size, "epochs": epochs,
                   "shuffle": bool(shuffle), "initial_epoch": initial_epoch}
    if owner._already_finished(fingerprint):
        return owner.history
    first_epoch, skip = initial_epoch, 0
    position = owner._resume_position(fingerprint)
    if position is not None:
        first_epoch, skip = position["epoch"], position["batch"]
        batches.set_state(position["rng"])
    callback_list = _callbacks(owner, callbacks, verbose, epochs, batches.steps)
    owner.stop_training = owner._interrupted = False
    transport = owner.transport
    callback_list.on_train_begin()
    logs = {}
    for epoch in range(first_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        up0, down0 = transport.bytes.snapshot()
        logs = {}
        client_loss = ClientLoss(getattr(owner.client_role, "log_names", ()))
        rng_state = batches.get_state()  # before the epoch draws its order
        for index, (bx, by, bw) in enumerate(batches):
            if index < skip:
                continue  # done before the checkpoint this fit resumed from
            if by is None:
                raise ValueError(
                    "`fit` needs labels: pass `y`, or a dataset that yields (x, y)."
                )
            callback_list.on_train_batch_begin(index)
            reply, regularization = protocol.train_step(
                owner.client_role, transport, owner.next_step(), bx, by, bw,
                reset_metrics=index == 0,
            )
            owner._after_train_step({"epoch": epoch, "batch": index + 1, "rng": rng_state,
                                     "fingerprint": fingerprint})
            client_loss.add(regularization, bx, reply.logs)
            logs = client_loss.into(dict(reply.logs))
            callback_list.on_train_batch_end(index, logs)
            if owner.stop_training:
                break
        skip = 0
        up1, down1 = transport.bytes.snapshot()
        logs = {**logs, "bytes_up": up1 - up0, "bytes_down": down1 - down0}
        if validation is not None and (epoch + 1) % validation_freq == 0:
            val_logs = _evaluate_batches(owner, validation, callback_list=None)
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
        callback_list.on_epoch_end(epoch, logs)
        if owner.stop_training:
            break
    callback_list.on_train_end(logs)
    owner._after_fit(not owner._interrupted, fingerprint)
    return owner.history


def _evaluate_batches(owner, batches, callback_list):
    transport = owner.transport
    up0, down0 = transport.bytes.snapshot()
    logs = {}
    client_loss = ClientLoss()
    for index, (bx, by, bw) in enumerate(batches):
        if by is None:
            raise ValueError("`evaluate` needs labels: pass `y`, or a dataset of (x, y).")
        if callback_list is not None:
            callback_list.on_test_batch_begin(index)
        reply, regularization = protocol.evaluate_step(
            owner.client_role, transport, owner.next_step(), bx, by, bw, reset_metrics=index == 0
        )
        client_loss.add(regularization, bx)
        logs = client_loss.into(dict(reply.logs))
        if callback_list is not None:
            callback_list.on_test_batch_end(index, logs)
    if not logs:
        raise ValueError("`evaluate` received no data: the input has zero samples.")
    up1, down1 = transport.bytes.snapshot()
    return {**logs, "bytes_up": up1 - up0, "bytes_down": down1 - down0}


def evaluate(owner, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None,
             callbacks=None, return_dict=False):
    owner.require_compiled("evaluate")
    verbose = 1 if verbose == "auto" else verbose
    batches = make_batches(x, y, sample_weight, batch_size, caller="evaluate")
    callback_list = _callbacks(owner, callbacks, verbose, 1, batches.steps)
    callback_list.on_test_begin()
    logs = _evaluate_batches(owner, batches, callback_list)
    callback_list.on_test_end(logs)
    if return_dict:
        return logs
    values = [v for k, v in logs.items() if not k.startswith("bytes_")]
    return values[0] if len(values) == 1 else values


def predict(owner, x, batch_size=None, verbose="auto", callbacks=None):
    owner.require_compiled("predict")
    verbose = 1 if verbose == "auto" else verbose
    batches = make_batches(x, batch_size=batch_size, caller="predict")
    callback_list = _callbacks(owner, callbacks, verbose, 1, batches.steps)
    callback_list.on_predict_begin()
    outputs = []
    for index, (bx, _, _) in enumerate(batches):
        callback_list.on_predict_batch_begin(index)
        reply = protocol.predict_step(owner.client_role, owner.transport, owner.next_step(), bx)
        outputs.append(reply.outputs)
        callback_list.on_predict_batch_end(index, {"outputs": reply.outputs})
    callback_list.on_predict_end()
    if not outputs:
        raise ValueError("`predict` received no data: the input has zero samples.")
    return keras.tree.map_structure(lambda *parts: np.concatenate(parts), *outputs)


class LoopOwner:
    """What the training loops and Keras callbacks need of the party running them.

    `SplitModel` (in-process) and `SplitClient` (over the network) both build on
    it: they set `client_role` and `transport` in `compile()`.
    """

    def __init__(self):
        self.stop_training = False
        self.history = None
        self.train_function = None  # TensorBoard looks for a graph here; there is none.
        # Set by compile(): the client's role and its transport to the server.
        self.client_role: Any = None
        self.transport: Any = None
        self._step = 0
        self._interrupted = False

    @property
    def optimizer(self):
        """The client's optimizer (the party that runs the training loop)."""
        return None if self.client_role is None else self.client_role.optimizer

    def require_compiled(self, caller: str) -> None:
        if self.client_role is None:
            raise RuntimeError(
                f"You must call `compile()` before `{caller}()` on this "
                f"{type(self).__name__}."
            )

    def next_step(self) -> int:
        self._step += 1
        return self._step

    @property
    def interrupted(self) -> bool:
        """True when the last `fit` stopped at `interrupt()`, resumable."""
        return self._interrupted

    def interrupt(self) -> None:
        """Stop `fit` after the current step, keeping its place for a resume
        (e.g. from a SIGTERM handler). EarlyStopping-style `stop_training`
        ends the fit for good instead."""
        self.stop_training = self._interrupted = True

    def export_client(self, path, format=None, optimizer=None):
        """Export the client half for on-device training (see
        `keras_split.export.export_client`). The device's optimizer defaults to a
        fresh copy of this client's compiled optimizer; the client's own
        objective (NoPeek) goes with it."""
        from keras_split.export import export_client

        if optimizer is None:
            if self.optimizer is None:
                raise ValueError("Pass `optimizer=` (SGD or Adam), or compile() first so the "
                                 "client's optimizer can be used on the device.")
            optimizer = type(self.optimizer).from_config(self.optimizer.get_config())
        return export_client(self.client, path, format=format, optimizer=optimizer,
                             objective=getattr(self.client_role, "objective", None))

    # Hooks for parties that checkpoint (see `SplitClient`); no-ops here.

    def _resume_position(self, fingerprint: dict) -> dict | None:
        """Where an interrupted fit with these arguments left off, if anywhere."""
        return None

    def _after_train_step(self, position: dict) -> None:
        """Called once a training step is fully applied; `position` is the next batch."""

    def _after_fit(self, finished: bool, fingerprint: dict) -> None:
        """Called when `fit` returns; `finished` is False after `interrupt()`."""

    def _already_finished(self, fingerprint: dict) -> bool:
        """Whether a fit with these arguments already ran to its end and must not
        train again (a rerun command line); `fit` then returns at once."""
        return False

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            validation_split=0.0, validation_data=None, shuffle=True, initial_epoch=0,
            sample_weight=None, validation_freq=1, seed=None):
        """Train across the cut; same arguments and return value as `keras.Model.fit`.

        `History.history` also has `bytes_up` and `bytes_down`: the bytes that
        crossed the cut in each epoch's training steps (and `val_bytes_*`).
        """
        return fit(self, x, y, batch_size, epochs, verbose, callbacks, validation_split,
                   validation_data, shuffle, initial_epoch, sample_weight, validation_freq, seed)

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None,
                 callbacks=None, return_dict=False):
        """Evaluate across the cut; as `keras.Model.evaluate`."""
        return evaluate(self, x, y, batch_size, verbose, sample_weight, callbacks, return_dict)

    def predict(self, x, batch_size=None, verbose="auto", callbacks=None):
        """Predict across the cut; as `keras.Model.predict`."""
        return predict(self, x, batch_size, verbose, callbacks)
