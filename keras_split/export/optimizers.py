"""Keras optimizers as pure update functions, for export.

A device applies the optimizer inside the exported model, so the update must
be written out: the same arithmetic as Keras 3's `SGD` and `Adam`, on explicit
tensors (parameters, gradients, slots, step count). Anything these functions
cannot reproduce exactly (weight decay, gradient clipping, EMA, learning-rate
schedules, AMSGrad) is refused at export time.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


class UnsupportedOptimizerError(ValueError):
    """An optimizer setting the device update cannot reproduce."""


def _constant(optimizer, name):
    value = getattr(optimizer, name)
    # Keras keeps a schedule in `_learning_rate` and answers `learning_rate`
    # with its current value.
    stored = getattr(optimizer, f"_{name}", value)
    if isinstance(stored, keras.optimizers.schedules.LearningRateSchedule) or callable(stored):
        raise UnsupportedOptimizerError(
            f"`{name}` is a schedule; the device update needs a constant. Export with a "
            "constant learning rate (a schedule on the device is not supported yet).")
    return float(keras.ops.convert_to_numpy(value))


def _check_plain(optimizer):
    for name in ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm"):
        if getattr(optimizer, name, None):
            raise UnsupportedOptimizerError(
                f"{type(optimizer).__name__}({name}=...) is not supported on the device; "
                f"export with an optimizer without {name}.")
    if getattr(optimizer, "use_ema", False):
        raise UnsupportedOptimizerError("use_ema=True is not supported on the device.")
    if getattr(optimizer, "gradient_accumulation_steps", None):
        raise UnsupportedOptimizerError(
            "gradient_accumulation_steps is not supported on the device.")


class SGD:
    """`keras.optimizers.SGD`: plain, with momentum, or Nesterov."""

    def __init__(self, learning_rate, momentum=0.0, nesterov=False):
        self.learning_rate, self.momentum, self.nesterov = learning_rate, momentum, nesterov
        self.name = "sgd"

    def slot_names(self):
        return ["momentum"] if self.momentum else []

    def apply(self, params, grads, slots, step):
        lr = tf.constant(self.learning_rate, tf.float32)
        if not self.momentum:
            return [p - lr * g for p, g in zip(params, grads, strict=True)], []
        momentum = tf.constant(self.momentum, tf.float32)
        new_params, new_slots = [], []
        for p, g, m in zip(params, grads, slots, strict=True):
            m = -lr * g + m * momentum
            p = p + (-lr * g + m * momentum if self.nesterov else m)
            new_params.append(p)
            new_slots.append(m)
        return new_params, new_slots


class Adam:
    """`keras.optimizers.Adam` (without AMSGrad)."""

    def __init__(self, learning_rate, beta_1, beta_2, epsilon):
        self.learning_rate, self.beta_1, self.beta_2 = learning_rate, beta_1, beta_2
        self.epsilon = epsilon
        self.name = "adam"

    def slot_names(self):
        return ["m", "v"]

    def apply(self, params, grads, slots, step):
        local_step = step + 1.0
        beta_1 = tf.constant(self.beta_1, tf.float32)
        beta_2 = tf.constant(self.beta_2, tf.float32)
        alpha = (self.learning_rate * tf.sqrt(1.0 - tf.pow(beta_2, local_step))
                 / (1.0 - tf.pow(beta_1, local_step)))
        new_params, new_slots = [], []
        count = len(params)
        for p, g, m, v in zip(params, grads, slots[:count], slots[count:], strict=True):
            m = m + (g - m) * (1.0 - beta_1)
            v = v + (g * g - v) * (1.0 - beta_2)
            new_params.append(p - (m * alpha) / (tf.sqrt(v) + self.epsilon))
            new_slots.append((m, v))
        return new_params, [m for m, _ in new_slots] + [v for _, v in new_slots]


def from_keras(optimizer):
    """The pure update for a Keras optimizer (an instance, or "sgd"/"adam")."""
    if isinstance(optimizer, str):
        optimizer = keras.optimizers.get(optimizer)
    _check_plain(optimizer)
    if type(optimizer) is keras.optimizers.SGD:
        return SGD(_constant(optimizer, "learning_rate"), float(optimizer.momentum),
                   bool(optimizer.nesterov))
    if type(optimizer) is keras.optimizers.Adam:
        if optimizer.amsgrad:
            raise UnsupportedOptimizerError("Adam(amsgrad=True) is not supported on the device.")
        return Adam(_constant(optimizer, "learning_rate"), float(optimizer.beta_1),
                    float(optimizer.beta_2), float(optimizer.epsilon))
    raise UnsupportedOptimizerError(
        f"{type(optimizer).__name__} is not supported on the device; export with "
        "keras.optimizers.SGD or keras.optimizers.Adam.")


def initial_slots(update, params) -> list[np.ndarray]:
    """Zero slots, one per slot name per parameter (all of the first name first)."""
    return [np.zeros(p.shape, np.float32) for _ in update.slot_names() for p in params]
