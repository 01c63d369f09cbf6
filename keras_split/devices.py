"""The server half's step on several accelerators, with a `tf.distribute` strategy.

A server with several GPUs runs its half data-parallel: `DistributedServerRole`
splits each message's batch into one contiguous shard per replica, runs the
forward and backward pass of every shard on its own device, sums the
gradients across replicas (the optimizer's all-reduce), applies one update to
the mirrored weights, and returns the cut gradient of the whole batch in the
client's row order. The client sees the same reply as from a `ServerRole` on
one device:

    loss         L = sum over replicas r of (n_r / n) * L_r + R
                 (L_r: the server's loss on shard r, a mean over its n_r rows;
                 R: the model's regularization losses, counted once)
    cut gradient dL/dz, rows in the order the client sent them
    update       one optimizer step with dL/dW summed over replicas

This equals the one-device step for losses that are means over samples
(Keras's default "sum_over_batch_size" reduction), up to float summation
order, when the server half has no per-shard statistics: use
`BatchNormalization(synchronized=True)` (a plain BatchNormalization would
normalise each shard by its own statistics, as in any data-parallel Keras
training), and note that Dropout draws its masks per replica. A batch smaller
than the replica count leaves some shards empty; they contribute nothing.

Every guarantee of `ServerRole` holds: a message is checked before any op, and
a refused step (non-finite loss, gradients or state on any replica) changes
nothing on any replica.

Build (or load) the server half inside the strategy's scope, so its weights
are mirrored on the devices, and pass the strategy:

```python
strategy = tf.distribute.MirroredStrategy()          # every local GPU
with strategy.scope():
    server_half = keras.models.load_model("server.keras")
role = DistributedServerRole(server_half, "adam", loss, metrics=["accuracy"],
                             strategy=strategy)
server = keras_split.SplitServer(server_half, role=role, tokens=..., certificate=...,
                                 private_key=...)
```

Only the server half is distributed: a client trains on one device
(`SplitModel.fit` refuses a strategy, saying so).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_split.roles import ServerRole, _all_finite, _representable

__all__ = ["DistributedServerRole"]


class DistributedServerRole(ServerRole):
    """A `ServerRole` whose steps run data-parallel under a `tf.distribute` strategy.

    Args:
        model: the server half, built or loaded inside `strategy.scope()`.
        optimizer, loss, metrics, loss_weights, max_activation,
        max_sample_weight: as for `ServerRole`.
        strategy: a `tf.distribute.Strategy` with one or more replicas
            (`MirroredStrategy` for the GPUs of one machine).

    See the module's docstring for the semantics and an example.
    """

    def __init__(self, model: keras.Model, optimizer, loss, metrics=None, loss_weights=None,
                 *, strategy: tf.distribute.Strategy, **limits):
        if not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError(f"`strategy` must be a tf.distribute.Strategy, received "
                            f"{type(strategy).__name__}.")
        outside = [v.path for v in model.variables
                   if not strategy.extended.variable_created_in_scope(getattr(v, "value", v))]
        if outside:
            raise ValueError(
                f"The server half {model.name!r} was built outside the strategy's scope "
                f"({len(outside)} variables, first {outside[0]!r}), so its weights live on one "
                "device. Build or load it inside `with strategy.scope():` and pass that model.")
        self.strategy = strategy
        with strategy.scope():
            super().__init__(model, optimizer, loss, metrics, loss_weights, **limits)
        self._train = tf.function(self._distributed_train, reduce_retracing=True)
        self._evaluate = tf.function(self._distributed_evaluate, reduce_retracing=True)

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    # Variables are created in the strategy's scope: the first message's build,
    # and the optimizer's slots that state() and restore() may build.
    def _build(self, message) -> None:
        with self.strategy.scope():
            super()._build(message)

    def state(self):
        with self.strategy.scope():
            return super().state()

    def restore(self, arrays, path) -> None:
        with self.strategy.scope():
            super().restore(arrays, path)

    # -- one step, sharded ------------------------------------------------------------

    def _shards(self, activations, labels, sample_weight):
        """Per-replica values: replica r gets rows [r n / R, (r + 1) n / R)."""
        replicas = self.replicas
        batch = tf.shape(activations[0])[0]

        def shard(context):
            r = context.replica_id_in_sync_group
            start, end = (r * batch) // replicas, ((r + 1) * batch) // replicas

            def take(t):
                return None if t is None else t[start:end]

            return (tuple(take(a) for a in activations),
                    tf.nest.map_structure(take, labels),
                    take(sample_weight))

        return self.strategy.experimental_distribute_values_from_function(shard)

    def _shard_loss(self, activations, labels, sample_weight, batch, training):
        """This replica's share of the whole batch's loss, and its predictions."""
        y_pred = self.model(self._inputs(list(activations)), training=training)
        regularization = tf.add_n([tf.cast(x, "float32") for x in self.model.losses]) \
            if self.model.losses else tf.constant(0.0)
        rows = tf.shape(activations[0])[0]
        # Keras divides every loss by the replica count under a strategy (it
        # assumes equal shards); undone here, and weighted by the shard's rows.
        loss = self.model.compute_loss(x=None, y=labels, y_pred=y_pred,
                                       sample_weight=sample_weight,
                                       training=training) * self.replicas
        share = tf.cast(rows, loss.dtype) / tf.cast(batch, loss.dtype)
        data = tf.where(rows > 0, (loss - tf.cast(regularization, loss.dtype)) * share, 0.0)
        return data + tf.cast(regularization, loss.dtype) / self.replicas, y_pred

    def _count_if(self, accepted, total, activations, labels, y_pred, sample_weight) -> None:
        """In a replica: an accepted step's loss and metrics, for its shard's rows
        (the loss tracker's mean over replicas is then the whole batch's loss)."""
        rows = tf.shape(activations[0])[0]

        def count():
            self.loss_tracker.update_state(total, sample_weight=rows)
            self._logs(labels, y_pred, sample_weight)
            return tf.constant(True)

        tf.cond(accepted, count, lambda: tf.constant(False))

    def _distributed_train(self, activations, labels, sample_weight):
        batch = tf.shape(activations[0])[0]

        def replica(shard_activations, shard_labels, shard_weight):
            replica_context = tf.distribute.get_replica_context()
            shard_activations = [tf.convert_to_tensor(a) for a in shard_activations]
            with tf.GradientTape() as tape:
                tape.watch(shard_activations)
                loss, y_pred = self._shard_loss(shard_activations, shard_labels, shard_weight,
                                                batch, training=True)
            variables = self.model.trainable_variables
            grads = tape.gradient(loss, shard_activations + list(variables))
            cut_grads, var_grads = grads[: len(shard_activations)], grads[len(shard_activations):]
            var_grads = [tf.zeros_like(v) if g is None else g
                         for g, v in zip(var_grads, variables, strict=True)]
            total = replica_context.all_reduce("sum", loss)

            def everywhere(flag):  # true on every replica: no replica has it false
                return replica_context.all_reduce("sum", 1.0 - tf.cast(flag, "float32")) < 0.5

            loss_ok = tf.math.is_finite(total)  # the same total on every replica
            grads_ok = everywhere(_representable(grads))
            state_ok = everywhere(_all_finite(self.model.non_trainable_variables))
            ok = loss_ok & grads_ok & state_ok
            self._count_if(ok, total, shard_activations, shard_labels, y_pred, shard_weight)
            # Summed here, applied once below: the optimizer's own all-reduce
            # is a synchronisation point, which TensorFlow does not allow
            # inside the condition that makes a refused step change nothing.
            summed = replica_context.all_reduce("sum", var_grads)
            return ok, loss_ok, grads_ok, state_ok, total, cut_grads, summed

        ok, loss_ok, grads_ok, state_ok, total, cut_grads, summed = self.strategy.run(
            replica, args=self._shards(activations, labels, sample_weight))
        first = self.strategy.experimental_local_results
        variables = self.model.trainable_variables
        summed = [first(g)[0] for g in summed]

        def apply():
            self.model.optimizer.apply(summed, variables)
            return tf.constant(True)

        tf.cond(first(ok)[0], apply, lambda: tf.constant(False))
        cut_grads = [self.strategy.gather(g, axis=0) for g in cut_grads]
        return (first(loss_ok)[0], first(grads_ok)[0], first(state_ok)[0], first(total)[0],
                cut_grads, self._results())

    def _distributed_evaluate(self, activations, labels, sample_weight):
        batch = tf.shape(activations[0])[0]

        def replica(shard_activations, shard_labels, shard_weight):
            replica_context = tf.distribute.get_replica_context()
            loss, y_pred = self._shard_loss(list(shard_activations), shard_labels, shard_weight,
                                            batch, training=False)
            total = replica_context.all_reduce("sum", loss)
            loss_ok = tf.math.is_finite(total)  # the same total on every replica
            self._count_if(loss_ok, total, shard_activations, shard_labels, y_pred,
                           shard_weight)
            return loss_ok, total

        loss_ok, total = self.strategy.run(
            replica, args=self._shards(activations, labels, sample_weight))
        first = self.strategy.experimental_local_results
        return first(loss_ok)[0], first(total)[0], self._results()
