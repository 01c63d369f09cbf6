"""Split a dataset between parties: by samples (horizontal) or by features (vertical).

- `shard_iid(x, y, clients)`: a random, equal-sized share of the samples each.
- `shard_dirichlet(x, y, clients, alpha)`: label skew, the usual non-IID
  benchmark: for each class, its samples are divided between the clients in
  proportions drawn from Dirichlet(alpha); small alpha means each client sees
  few classes.
- `split_columns(x, groups)`: vertical partitioning, each party a group of
  feature columns of the same samples (aligned by row, i.e. sample ID).
"""

from __future__ import annotations

import numpy as np


def _check(x, y, clients):
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same number of samples, received {len(x)} "
                         f"vs. {len(y)}.")
    if not isinstance(clients, int) or not 1 <= clients <= len(x):
        raise ValueError(f"`clients` must be an integer between 1 and the number of samples "
                         f"({len(x)}), received {clients!r}.")
    return x, y


def shard_iid(x, y, clients: int, seed=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffle, then deal the samples into `clients` shards of (almost) equal size."""
    x, y = _check(x, y, clients)
    order = np.random.default_rng(seed).permutation(len(x))
    return [(x[part], y[part]) for part in np.array_split(order, clients)]


def shard_dirichlet(x, y, clients: int, alpha: float = 0.5, seed=None,
                    min_size: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Label-skewed shards: class c's samples go to client k with probability p_k(c),
    p(c) ~ Dirichlet(alpha). Redraws until every client has `min_size` samples."""
    x, y = _check(x, y, clients)
    if not alpha > 0:
        raise ValueError(f"`alpha` must be positive, received {alpha!r}.")
    labels = y.reshape(len(y), -1)[:, 0] if y.ndim > 1 else y
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts = [[] for _ in range(clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [(x[np.sort(p)], y[np.sort(p)]) for p in parts]
    raise ValueError(f"Could not give every one of {clients} clients {min_size} samples with "
                     f"alpha={alpha}; use a larger alpha or fewer clients.")


def split_columns(x, groups) -> list[np.ndarray]:
    """Columns of a 2-D `x` for each party: `groups` is a list of column index lists
    (or slices), which must not overlap."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"`x` must be 2-D (samples, features), received shape {x.shape}.")
    columns = [np.arange(x.shape[1])[g] for g in groups]
    taken = np.concatenate(columns)
    if len(set(taken.tolist())) != len(taken):
        raise ValueError("The column groups overlap: each feature must belong to one party.")
    return [x[:, c] for c in columns]
