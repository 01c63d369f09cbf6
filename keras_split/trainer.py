"""fit / evaluate / predict loops around the split step, with Keras callbacks.

The loops run on the party that holds the data (the client). They use Keras's
own `CallbackList`, `History` and progress bar, so callbacks behave as they do
with `keras.Model.fit`. The object given to callbacks as their `model` is the
`SplitModel` (or network client): it offers `stop_training`, `save`,
`save_weights`, `get_weights`/`set_weights`, `layers` and `optimizer` (the
client's), which is what the stock callbacks touch.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_split import protocol
from keras_split.batching import (
    RAN_OUT,
    check_class_weight,
    check_steps,
    is_data_stream,
    make_batches,
)


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


def _counts(logs) -> tuple[dict, dict]:
    logs = dict(logs or {})
    return {k: v for k, v in logs.items() if "bytes_" not in k}, \
        {k: v for k, v in logs.items() if "bytes_" in k}


class ByteCountProgbar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, with the byte counters as integers (the default bar
    of every split `fit`/`evaluate`).

    Keras's bar prints every value as a float (`bytes_down: 7769600.0000`,
    `val_bytes_down: 0.0000e+00`). This one leaves the counters out of the bar
    and prints them under it, once per epoch (or evaluation):
    `bytes up 7,789,024, down 7,769,600; validation up 866,160, down 0`.
    A `keras.callbacks.ProgbarLogger` of your own in `callbacks=` replaces it.
    """

    def __init__(self):
        super().__init__()
        self._fitting = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._fitting = True  # validation inside fit: its counts come with the epoch's

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, _counts(logs)[0])

    def on_test_batch_end(self, batch, logs=None):
        super().on_test_batch_end(batch, _counts(logs)[0])

    def on_epoch_end(self, epoch, logs=None):
        shown, counts = _counts(logs)
        super().on_epoch_end(epoch, shown)
        self._print_counts(counts)

    def on_test_end(self, logs=None):
        shown, counts = _counts(logs)
        super().on_test_end(shown)
        if not self._fitting:
            self._print_counts(counts)

    def _print_counts(self, counts: dict) -> None:
        if not self.verbose or not counts:
            return
        parts = [f"bytes up {int(counts['bytes_up']):,}, down {int(counts['bytes_down']):,}"
                 ] if "bytes_up" in counts else []
        if "val_bytes_up" in counts:
            parts.append(f"validation up {int(counts['val_bytes_up']):,}, down "
                         f"{int(counts['val_bytes_down']):,}")
        if parts:
            print(f"  {'; '.join(parts)}", flush=True)


def _callbacks(owner, callbacks, verbose, epochs, steps, add_history=True):
    callbacks = list(callbacks or [])
    if verbose != 0 and not any(isinstance(c, keras.callbacks.ProgbarLogger)
                                for c in callbacks):
        callbacks.append(ByteCountProgbar())
    return keras.callbacks.CallbackList(
        callbacks,
        add_history=add_history,
        add_progbar=verbose != 0,
        verbose=verbose,
        epochs=epochs,
        steps=steps,
        model=owner,
    )


def _verbose(verbose):
    if verbose == "auto":
        return 1
    if verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2; received {verbose!r}.")
    return verbose


def check_single_device(owner, caller: str) -> None:
    """Refuse to run under a `tf.distribute` strategy, with what is supported.

    Each party's step is one compiled call on one device (the server's over
    its own batch, the client's around the exchange at the cut); a strategy
    would need the replicas' cut tensors gathered into one message and the
    cut gradient sent back to each, which this loop does not do. Without this
    check the failure is a TensorFlow internal ("DistributedVariable.handle is
    not available outside the replica context").
    """
    name = type(owner).__name__
    supported = (
        "keras-split runs each party's step on one device (the default strategy), except "
        "a server half served by keras_split.devices.DistributedServerRole (its step "
        "data-parallel over the strategy's replicas). Build the model, and call compile() "
        "and fit(), outside any `strategy.scope()`."
    )
    if tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
        raise ValueError(
            f"`{name}.{caller}()` was called inside the scope of a tf.distribute "
            f"{type(strategy).__name__}. {supported}")
    optimizer = getattr(owner, "optimizer", None)
    variables = [(layer.name, w) for layer in getattr(owner, "layers", ()) for w in layer.weights]
    if optimizer is not None:
        variables += [(f"the optimizer {optimizer.name!r}", v) for v in optimizer.variables]
    for where, variable in variables:
        value = getattr(variable, "value", variable)
        if isinstance(value, tf.distribute.DistributedValues):
            raise ValueError(
                f"`{name}.{caller}()` cannot train distributed variables: {where!r} holds "
                f"{type(value).__name__}s, created inside a tf.distribute strategy's scope. "
                f"{supported}")


def _check_validation_freq(validation_freq) -> None:
    if isinstance(validation_freq, bool):
        ok = False
    elif isinstance(validation_freq, numbers.Integral):
        ok = validation_freq >= 1
    elif isinstance(validation_freq, (list, tuple, set, range)):
        ok = all(isinstance(e, numbers.Integral) and not isinstance(e, bool) and e >= 1
                 for e in validation_freq)
    else:
        ok = False
    if not ok:
        raise ValueError(
            "`validation_freq` must be a positive integer (validate every N epochs) or a list "
            "of 1-based epoch numbers to validate after, e.g. [1, 5, 10]; received "
            f"{validation_freq!r}.")


def _should_validate(epoch: int, validation_freq) -> bool:
    """Keras's rule: `epoch` is 0-based, `validation_freq` counts from 1."""
    if isinstance(validation_freq, numbers.Integral):
        return (epoch + 1) % validation_freq == 0
    return epoch + 1 in validation_freq


def _validation_batches(validation_data, batch_size, validation_steps):
    if validation_data is None:
        if validation_steps is not None:
            check_steps("validation_steps", validation_steps, "fit")
        return None
    if isinstance(validation_data, list) and len(validation_data) in (2, 3):
        validation_data = tuple(validation_data)  # as Keras reads a list
    if isinstance(validation_data, tuple):
        if len(validation_data) not in (2, 3):
            raise ValueError(
                "`validation_data` must be (x_val, y_val), (x_val, y_val, sample_weight), a "
                "tf.data.Dataset, a PyDataset or a generator; received a tuple of "
                f"{len(validation_data)} items."
            )
        return make_batches(*validation_data, batch_size=batch_size, caller="fit",
                            steps=validation_steps, steps_name="validation_steps")
    return make_batches(validation_data, batch_size=batch_size, caller="fit",
                        steps=validation_steps, steps_name="validation_steps")


def _hold_out(x, y, sample_weight, validation_split):
    """Keras's rule: the last `validation_split` of the samples, before shuffling."""
    if not 0.0 < validation_split < 1.0:
        raise ValueError(
            f"`validation_split` must be in (0, 1), received {validation_split!r}."
        )
    if is_data_stream(x):
        raise ValueError(
            "`validation_split` is only supported for arrays; for a tf.data.Dataset, a "
            "PyDataset or a generator pass `validation_data` instead."
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


def _fingerprint(batches, batch_size, epochs, shuffle, initial_epoch, steps_per_epoch,
                 class_weight) -> dict:
    """What a resumed fit must agree on with the fit that wrote the checkpoint.

    Arguments added since the first checkpoints are recorded only when given,
    so a checkpoint written without them still resumes.
    """
    fingerprint = {"steps": batches.num_batches, "batch_size": batch_size, "epochs": epochs,
                   "shuffle": bool(shuffle), "initial_epoch": initial_epoch}
    if steps_per_epoch is not None:
        fingerprint["steps_per_epoch"] = int(steps_per_epoch)
    if class_weight:
        # A list of pairs: what the JSON checkpoint header gives back.
        fingerprint["class_weight"] = [[int(k), float(v)]
                                       for k, v in sorted(class_weight.items())]
    return fingerprint


def fit(owner, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
        validation_split=0.0, validation_data=None, shuffle=True, class_weight=None,
        sample_weight=None, initial_epoch=0, steps_per_epoch=None, validation_steps=None,
        validation_batch_size=None, validation_freq=1, seed=None, pipeline=1):
    owner.require_compiled("fit")
    check_single_device(owner, "fit")
    if isinstance(pipeline, bool) or not isinstance(pipeline, numbers.Integral) or pipeline < 1:
        raise ValueError(f"`pipeline` must be an integer >= 1 (the training steps in flight), "
                         f"received {pipeline!r}.")
    pipeline = int(pipeline)
    if pipeline > 1 and getattr(owner, "checkpoint_path", None) is not None:
        raise ValueError(
            "`pipeline` > 1 cannot be combined with a client checkpoint (`checkpoint_dir`): "
            "a checkpoint is taken after each applied step, when the server has already "
            "applied the steps in flight after it, which a resume cannot reconcile. Use "
            "pipeline=1 with checkpoints.")
    # Every argument is checked before anything runs: a refused fit changes nothing.
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"`epochs` must be a positive integer, received {epochs!r}.")
    if (isinstance(initial_epoch, bool) or not isinstance(initial_epoch, numbers.Integral)
            or initial_epoch < 0):
        raise ValueError(
            "`initial_epoch` must be an integer >= 0, the (0-based) epoch to start from; "
            f"received {initial_epoch!r}.")
    verbose = _verbose(verbose)
    _check_validation_freq(validation_freq)
    if validation_split and validation_data is None:
        x, y, sample_weight, validation_data = _hold_out(x, y, sample_weight, validation_split)
    batches = make_batches(x, y, sample_weight, batch_size, shuffle=shuffle, seed=seed,
                           steps=steps_per_epoch, class_weight=class_weight)
    validation = _validation_batches(validation_data, validation_batch_size or batch_size,
                                     validation_steps)
    fingerprint = _fingerprint(batches, batch_size, epochs, shuffle, initial_epoch,
                               steps_per_epoch, check_class_weight(class_weight))
    if owner._already_finished(fingerprint):
        return owner.history
    first_epoch, skip = initial_epoch, 0
    position = owner._resume_position(fingerprint)
    if position is not None:
        first_epoch, skip = position["epoch"], position["batch"]
        batches.set_state({"rng": position["rng"],
                           "offset": position.get("offset", position["batch"])})
    callback_list = _callbacks(owner, callbacks, verbose, epochs, batches.steps)
    owner.stop_training = owner._interrupted = False
    transport = owner.transport
    callback_list.on_train_begin()
    logs: dict = {}
    epoch_logs: dict | None = None
    for epoch in range(first_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        up0, down0 = transport.bytes.snapshot()
        logs = {}
        client_loss = ClientLoss(getattr(owner.client_role, "log_names", ()))
        pipe = None if pipeline == 1 else protocol.Pipeline(
            owner.client_role, transport, pipeline, owner.next_step, owner._rewind_step)

        def finished(index, bx, reply, regularization, position, client_loss=client_loss):
            nonlocal logs
            owner._after_train_step(position)
            client_loss.add(regularization, bx, reply.logs)
            logs = client_loss.into(dict(reply.logs))
            callback_list.on_train_batch_end(index, logs)

        with contextlib.closing(batches.epoch(skip)) as epoch_batches, \
                _abandon_on_error(pipe):
            for index, (bx, by, bw) in epoch_batches:
                if by is None:
                    raise ValueError(
                        "`fit` needs labels: pass `y`, or data that yields (x, y)."
                    )
                callback_list.on_train_batch_begin(index)
                position = {"epoch": epoch, "batch": index + 1, **batches.get_state(),
                            "fingerprint": fingerprint}
                if pipe is None:
                    reply, regularization = protocol.train_step(
                        owner.client_role, transport, owner.next_step(), bx, by, bw,
                        reset_metrics=index == 0,
                    )
                    finished(index, bx, reply, regularization, position)
                else:
                    pipe.send(bx, by, bw, reset_metrics=index == 0, tag=(index, position))
                    while pipe.full and not owner.stop_training:
                        done = pipe.take()
                        finished(done.tag[0], done.x, done.reply, done.regularization,
                                 done.tag[1])
                if owner.stop_training:
                    break
            # The steps still in flight at the end of the epoch (or at a stop)
            # complete: the server has them already.
            for done in pipe.drain() if pipe is not None else ():
                finished(done.tag[0], done.x, done.reply, done.regularization, done.tag[1])
        skip = 0
        if batches.exhausted:
            # Nothing left to train on (a generator used up): Keras's warning,
            # and the fit ends here rather than reporting an empty epoch.
            warnings.warn(RAN_OUT, stacklevel=2)
            break
        up1, down1 = transport.bytes.snapshot()
        logs = {**logs, "bytes_up": up1 - up0, "bytes_down": down1 - down0}
        if validation is not None and _should_validate(epoch, validation_freq):
            validation.reset()
            callback_list.on_test_begin()
            val_logs = _evaluate_batches(owner, validation, callback_list)
            callback_list.on_test_end(val_logs)
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
        callback_list.on_epoch_end(epoch, logs)
        epoch_logs = logs
        if owner.stop_training:
            break
    callback_list.on_train_end(epoch_logs if epoch_logs is not None else logs)
    owner._after_fit(not owner._interrupted, fingerprint)
    return owner.history


@contextlib.contextmanager
def _abandon_on_error(pipe):
    """Leave no step in flight when a pipelined epoch ends on an exception."""
    try:
        yield
    except BaseException:
        if pipe is not None:
            pipe.abandon()
        raise


def _evaluate_batches(owner, batches, callback_list):
    transport = owner.transport
    up0, down0 = transport.bytes.snapshot()
    logs = {}
    client_loss = ClientLoss()
    with contextlib.closing(batches.epoch()) as epoch_batches:
        for index, (bx, by, bw) in epoch_batches:
            if by is None:
                raise ValueError("`evaluate` needs labels: pass `y`, or data that yields "
                                 "(x, y).")
            if callback_list is not None:
                callback_list.on_test_batch_begin(index)
            reply, regularization = protocol.evaluate_step(
                owner.client_role, transport, owner.next_step(), bx, by, bw,
                reset_metrics=index == 0
            )
            client_loss.add(regularization, bx)
            logs = client_loss.into(dict(reply.logs))
            if callback_list is not None:
                callback_list.on_test_batch_end(index, logs)
    if not logs:
        raise ValueError("`evaluate` received no data: the input has zero samples (or a "
                         "generator was already used up).")
    up1, down1 = transport.bytes.snapshot()
    return {**logs, "bytes_up": up1 - up0, "bytes_down": down1 - down0}


def evaluate(owner, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None,
             steps=None, callbacks=None, return_dict=False):
    owner.require_compiled("evaluate")
    check_single_device(owner, "evaluate")
    verbose = _verbose(verbose)
    batches = make_batches(x, y, sample_weight, batch_size, caller="evaluate", steps=steps,
                           steps_name="steps")
    callback_list = _callbacks(owner, callbacks, verbose, 1, batches.steps, add_history=False)
    callback_list.on_test_begin()
    logs = _evaluate_batches(owner, batches, callback_list)
    callback_list.on_test_end(logs)
    if return_dict:
        return logs
    values = [v for k, v in logs.items() if not k.startswith("bytes_")]
    return values[0] if len(values) == 1 else values


def predict(owner, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
    owner.require_compiled("predict")
    check_single_device(owner, "predict")
    verbose = _verbose(verbose)
    batches = make_batches(x, batch_size=batch_size, caller="predict", steps=steps,
                           steps_name="steps")
    callback_list = _callbacks(owner, callbacks, verbose, 1, batches.steps, add_history=False)
    callback_list.on_predict_begin()
    outputs = []
    with contextlib.closing(batches.epoch()) as epoch_batches:
        for index, (bx, _, _) in epoch_batches:
            callback_list.on_predict_batch_begin(index)
            reply = protocol.predict_step(owner.client_role, owner.transport,
                                          owner.next_step(), bx)
            outputs.append(reply.outputs)
            callback_list.on_predict_batch_end(index, {"outputs": reply.outputs})
    callback_list.on_predict_end()
    if not outputs:
        raise ValueError("`predict` received no data: the input has zero samples (or a "
                         "generator was already used up).")
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

    def _rewind_step(self, step: int) -> None:
        """Number the next step `step + 1` again (a pipelined step was refused:
        it and the steps sent after it were not applied)."""
        self._step = step

    @property
    def interrupted(self) -> bool:
        """True when the last `fit` stopped at `interrupt()`, resumable."""
        return self._interrupted

    def interrupt(self) -> None:
        """Stop `fit` after the current step, keeping its place for a resume
        (e.g. from a SIGTERM handler). EarlyStopping-style `stop_training`
        ends the fit for good instead."""
        self.stop_training = self._interrupted = True

    def export_client(self, path, format=None, optimizer=None, **options):
        """Export the client half for on-device training (see
        `keras_split.export.export_client`, which takes the `options`, such as
        `dropout="inference"`). The device's optimizer defaults to a fresh copy
        of this client's compiled optimizer; the client's own objective
        (NoPeek) goes with it."""
        from keras_split.export import export_client

        if optimizer is None:
            if self.optimizer is None:
                raise ValueError("Pass `optimizer=` (SGD or Adam), or compile() first so the "
                                 "client's optimizer can be used on the device.")
            optimizer = type(self.optimizer).from_config(self.optimizer.get_config())
        return export_client(self.client, path, format=format, optimizer=optimizer,
                             objective=getattr(self.client_role, "objective", None), **options)

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
            validation_split=0.0, validation_data=None, shuffle=True, class_weight=None,
            sample_weight=None, initial_epoch=0, steps_per_epoch=None, validation_steps=None,
            validation_batch_size=None, validation_freq=1, seed=None, pipeline=1):
        """Train across the cut; same arguments and return value as `keras.Model.fit`.

        `x` may be arrays (with `y`, `sample_weight`), a `tf.data.Dataset`, a
        `keras.utils.PyDataset` or a Python generator yielding `(x, y)` or
        `(x, y, sample_weight)`. `class_weight` becomes per-sample weights,
        sent to the server with the labels. With `steps_per_epoch` the data
        iterator carries on across epochs, as in Keras (infinite datasets need
        it). `seed` (ours) seeds the shuffling of arrays and PyDataset batches.

        `History.history` also has `bytes_up` and `bytes_down`: the bytes that
        crossed the cut in each epoch's training steps (and `val_bytes_*`).

        `pipeline` (ours): training steps kept in flight, to hide the link's
        round trip. 1 (the default) is sequential training. With D > 1 the
        client sends the cut values of up to D batches before it applies the
        oldest one's reply: the server handles every step in order with
        up-to-date weights, and the client's forward pass of a batch uses its
        weights from up to D-1 updates before (see `protocol.Pipeline` for
        the exact semantics and what a refused step does). The steps in
        flight at the end of an epoch (or at `stop_training`) complete before
        validation. Not with a client checkpoint (`SplitClient(checkpoint_dir=)`).
        """
        return fit(self, x, y, batch_size, epochs, verbose, callbacks, validation_split,
                   validation_data, shuffle, class_weight, sample_weight, initial_epoch,
                   steps_per_epoch, validation_steps, validation_batch_size, validation_freq,
                   seed, pipeline)

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None,
                 steps=None, callbacks=None, return_dict=False):
        """Evaluate across the cut; as `keras.Model.evaluate` (`steps`: batches to draw)."""
        return evaluate(self, x, y, batch_size, verbose, sample_weight, steps, callbacks,
                        return_dict)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """Predict across the cut; as `keras.Model.predict` (`steps`: batches to draw)."""
        return predict(self, x, batch_size, verbose, steps, callbacks)
