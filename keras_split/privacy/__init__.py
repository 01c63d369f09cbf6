"""Privacy: measure what crosses the cut, and reduce it. A layer on top of the
core (the core never imports it).

Defences (`nopeek`, `defences`):
- `NoPeek(alpha)`: the client also minimises `alpha * dCor(x, cut)`; passed as
  `compile(..., nopeek=...)`. Nothing extra crosses the wire.
- `CutNoise` / `add_cut_noise`: norm clipping and Gaussian or Laplace noise on
  the cut activations (NOT differential privacy).
- `MaxNormAlignment`, `GaussianGradientNoise`: server-side perturbation of the
  cut gradients against label leakage (Li et al., ICLR 2022), as wrappers of a
  `ServerRole`.
- `randomized_response`, `RandomizedLabels`: epsilon-label-DP where the labels
  cross. U-shaped training (`split_chain(..., labels="client")`) keeps labels
  from being sent at all (but see `defences` on what its gradients still say).

Attacks (`attacks`), each returning numbers (and a figure with
`keras-split[plot]`): `model_inversion`, `label_leakage` (norm and cosine, with
`collect_cut_gradients`), `dcor_leakage`, and `audit`, which runs the set on a
trained split and prints one table (`keras-split audit` from a shell).

Hijacking (`hijack`): `HijackingServer`, a malicious server that steers the
client's features into a space it can invert (feature-space hijacking,
Pasquini et al. CCS 2021), `feature_space_hijacking` to run it against a
client, and `HijackDetector`, a client-side check in the spirit of
SplitGuard that flags a server whose gradients ignore the labels.

`distance_correlation(x, z)` (`dcor`) is the sample distance correlation in
`keras.ops`; `distance_correlation_gradients` its derivative with forward ops.

A defence here is a client-side term or a wrapper that receives a message and
returns one; it never reaches into a role's private fields.
"""

from keras_split.privacy.attacks import (
    audit,
    collect_cut_gradients,
    dcor_leakage,
    label_leakage,
    model_inversion,
    roc_auc,
)
from keras_split.privacy.dcor import distance_correlation, distance_correlation_gradients
from keras_split.privacy.defences import (
    CutNoise,
    GaussianGradientNoise,
    MaxNormAlignment,
    RandomizedLabels,
    add_cut_noise,
    randomized_response,
)
from keras_split.privacy.hijack import (
    HijackDetected,
    HijackDetector,
    HijackingServer,
    feature_space_hijacking,
)
from keras_split.privacy.nopeek import NoPeek

__all__ = [
    "CutNoise",
    "GaussianGradientNoise",
    "HijackDetected",
    "HijackDetector",
    "HijackingServer",
    "MaxNormAlignment",
    "NoPeek",
    "RandomizedLabels",
    "add_cut_noise",
    "audit",
    "collect_cut_gradients",
    "dcor_leakage",
    "distance_correlation",
    "distance_correlation_gradients",
    "feature_space_hijacking",
    "label_leakage",
    "model_inversion",
    "randomized_response",
    "roc_auc",
]
