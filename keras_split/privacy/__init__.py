"""Privacy defences, a layer on top of the core (the core never imports it).

- `distance_correlation(x, z)`: the sample distance correlation of two
  batches, in `keras.ops`, and `distance_correlation_gradients(x, z)`, its
  derivative written with forward ops (for devices) (`dcor`).
- `NoPeek(alpha)`: the client also minimises `alpha * dCor(x, cut)`; passed
  as `compile(..., nopeek=...)` (`nopeek`).

A defence here is a client-side term or a wrapper that receives a message and
returns one; it never reaches into a role's private fields.
"""

from keras_split.privacy.dcor import distance_correlation, distance_correlation_gradients
from keras_split.privacy.nopeek import NoPeek

__all__ = ["NoPeek", "distance_correlation", "distance_correlation_gradients"]
