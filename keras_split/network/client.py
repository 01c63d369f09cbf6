"""`SplitClient`: the client half training against a remote `SplitServer`."""

from __future__ import annotations

import logging
from pathlib import Path

import keras

from keras_split import checkpoint, trainer
from keras_split.network.transport import GrpcTransport
from keras_split.partition import spec_of
from keras_split.roles import ClientRole
from keras_split_wire import device_names
from keras_split_wire.rpc import ServerError

logger = logging.getLogger("keras_split.client")


class SplitClient(trainer.LoopOwner):
    """The client half, training against a remote `SplitServer`.

    Same `compile`/`fit`/`evaluate`/`predict`, progress bar, `History` and byte
    counters as `SplitModel`; the loss and metrics live on the server.

    Args:
        model: the client half (`split.client`).
        server: the server's "host:port".
        token: this client's bearer token; None when the server identifies
            clients by their certificates (mutual TLS).
        checkpoint_dir: a folder for `client.ckpt`, rewritten after every
            training step: weights, optimizer state, step counter, session and
            the position in the data. A client compiled on a folder that holds
            a checkpoint restores it and rejoins its session; calling `fit`
            with the same data and arguments then carries on from the next
            batch, in the same shuffled order. Delete the folder to start over.
        durable_checkpoints: also flush each checkpoint to disk (survives power
            loss, not only a killed process; costs an fsync per step).
        root_certificates, certificate, private_key, insecure, compression,
            timeout, retry_for, tls_hint, stream: as in `GrpcTransport` (the
            steps travel on one `Steps` stream per session unless stream=False).
    """

    def __init__(self, model: keras.Model, server: str, token: str | None = None,
                 checkpoint_dir=None, durable_checkpoints: bool = False,
                 **transport_options):
        super().__init__()
        self.client = model
        # Named as the device names them, so either kind of client opens the same session.
        self.cut_specs = tuple(spec_of(device_names.cut(i), t) for i, t in enumerate(model.outputs))
        self._transport_options = dict(server=server, token=token, **transport_options)
        self.checkpoint_path = None
        self._durable = durable_checkpoints
        if checkpoint_dir is not None:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            self.checkpoint_path = Path(checkpoint_dir) / "client.ckpt"
        self._position = None
        self._finished = None  # the fingerprint of the last fit that ran to its end
        # False: a fit identical to one this checkpoint saw finish returns at once
        # (a command run again must not silently train more epochs).
        self.repeat_finished_fit = True
        self.skipped_finished_fit = False

    @property
    def layers(self):
        return list(self.client.layers)

    def compile(self, optimizer="rmsprop", compression=None, nopeek=None):
        """Set the client's optimizer and open the session with the server.

        `compression` chooses the codec of the cut tensors (see `GrpcTransport`);
        it overrides one given to the constructor. `nopeek`, a
        `keras_split.privacy.NoPeek(alpha)`, makes this client also minimise
        the distance correlation between its raw batches and the activations
        it sends (see `SplitModel.compile`); the server is unaware of it and
        the messages are the same. With a checkpoint in `checkpoint_dir`, the
        weights, optimizer state and session are restored from it first.

        Raises:
            ValueError: inside a `tf.distribute` strategy's scope, or with a
                client half built in one, before any session is opened.
        """
        trainer.check_single_device(self, "compile")
        options = dict(self._transport_options)
        if compression is not None:
            options["compression"] = compression
        transport = GrpcTransport(options.pop("server"), options.pop("token"), **options)
        role = ClientRole(self.client, optimizer, objective=nopeek)
        role.build()
        resume = None
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            header = self._restore(role, transport.codec)
            resume = (header["session_id"], header["step"])
        last_step = transport.open(self.cut_specs, resume)
        self.client_role, self.transport = role, transport
        if resume is not None:
            # The server lined its session up with our step, or is one training
            # step ahead: we resend that step (same batch) and get its cached reply.
            if last_step not in (resume[1], resume[1] + 1):
                raise ServerError(f"The server resumed the session at step {last_step}, "
                                  f"this client's checkpoint is at step {resume[1]}.")
            self._step = resume[1]
        else:
            self._step = 0
            self._position = None
            self._save()

    def _restore(self, role: ClientRole, codec) -> dict:
        path = self.checkpoint_path
        header, arrays = checkpoint.read_for(path, "client", self.cut_specs)
        if header["codec"] != codec.spec:
            raise ValueError(
                f"{path} belongs to a session with compression {header['codec']!r}; compile "
                f"with the same compression (received {codec.spec!r}) or start over in a new "
                "checkpoint directory.")
        role.restore(arrays, path)
        self._position = header.get("position")
        self._finished = header.get("finished")
        return header

    def _save(self) -> None:
        if self.checkpoint_path is None:
            return
        header = {"party": "client", "cut": checkpoint.cut_of(self.cut_specs),
                  "step": self._step, "session_id": self.transport.session_id,
                  "codec": self.transport.codec.spec, "position": self._position,
                  "finished": self._finished}
        checkpoint.write(self.checkpoint_path, header, self.client_role.state(),
                         durable=self._durable)

    def _resume_position(self, fingerprint):
        position, self._position = self._position, None
        if position is None:
            return None
        if position["fingerprint"] != fingerprint and self.checkpoint_path is None:
            # No checkpoint: the position is only this process's memory of a fit
            # that ended in an error; a fit with other arguments starts afresh.
            logger.info("The previous fit stopped at epoch %d, batch %d; this fit has other "
                        "arguments, so it starts from the beginning.", position["epoch"] + 1,
                        position["batch"] + 1)
            return None
        if position["fingerprint"] != fingerprint:
            raise ValueError(
                f"This client's checkpoint ({self.checkpoint_path}) stopped in a fit with "
                f"{position['fingerprint']}, but this fit has {fingerprint}. Call fit with "
                "the same data and arguments to resume, or start over in a new checkpoint "
                "directory."
            )
        logger.info("Resuming fit at epoch %d, batch %d from %s.", position["epoch"] + 1,
                    position["batch"] + 1, self.checkpoint_path)
        return position

    def _after_train_step(self, position):
        self._position = position
        self._save()

    @property
    def resume_position(self) -> dict | None:
        """Where the next `fit` resumes (`{"epoch", "batch"}`, 0-based epoch and the
        next batch), as restored from the checkpoint; None for a fresh start."""
        if self._position is None:
            return None
        return {"epoch": self._position["epoch"], "batch": self._position["batch"]}

    def _after_fit(self, finished, fingerprint):
        if finished:
            self._position = None
            self._finished = fingerprint
        self._save()

    def _already_finished(self, fingerprint):
        self.skipped_finished_fit = (not self.repeat_finished_fit
                                     and self._position is None
                                     and self._finished == fingerprint)
        if self.skipped_finished_fit:
            logger.info("This client's checkpoint (%s) holds a fit with %s that ran to its "
                        "end; not training again.", self.checkpoint_path, fingerprint)
        return self.skipped_finished_fit

    def get_weights(self):
        return self.client.get_weights()

    def set_weights(self, weights):
        self.client.set_weights(weights)

    def train_rounds(self, x, y, batch_size=32, epochs_per_turn=1, seed=None, verbose=0,
                     on_turn=None):
        """Take part in the server's rounds (round-robin or SplitFed, see
        `keras_split.configurations.rounds`): for each turn, start from the client half the
        server hands out, train `epochs_per_turn` on (x, y), hand it back.
        `on_turn(round)` is called as each turn starts. Returns the rounds this
        client trained in."""
        self.require_compiled("train_rounds")
        trained, ready_for = [], 1
        while (turn := self.transport.turn(ready_for)) is not None:
            round_, weights = turn
            if on_turn is not None:
                on_turn(round_)
            self.set_weights(weights)
            self.fit(x, y, batch_size=batch_size, epochs=epochs_per_turn, seed=seed,
                     verbose=verbose)
            self.transport.report(round_, self.get_weights(), len(x))
            trained.append(round_)
            ready_for = round_ + 1
        return trained

    def save(self, filepath, overwrite=True):
        self.client.save(filepath, overwrite=overwrite)

    def save_weights(self, filepath, overwrite=True):
        self.client.save_weights(filepath, overwrite=overwrite)
