"""Checkpoints at step boundaries: one `.npz` file per party, replaced atomically.

A checkpoint holds variable values (the model's, the optimizer's, metric
state) as plain numeric arrays and a JSON header (step counters, sessions,
data position). It is read with `allow_pickle=False`: a checkpoint cannot
carry code. Writing goes to a temporary file that is flushed to disk and then
renamed over the old one, so a crash at any instant leaves either the previous
checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

FORMAT = 1
_HEADER = "__header__"


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this model or party."""


def write(path, header: dict, arrays: dict[str, np.ndarray], sync: bool = True) -> None:
    """Atomically replace `path` with `header` and `arrays`."""
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    encoded = np.frombuffer(json.dumps({"format": FORMAT, **header}).encode(), np.uint8)
    with open(temporary, "wb") as f:
        np.savez(f, **{_HEADER: encoded}, **arrays)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(temporary, path)


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a checkpoint written by `write`: (header, arrays)."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} is not a readable keras_split checkpoint: {error}") \
            from None
    try:
        header = json.loads(arrays.pop(_HEADER).tobytes().decode())
    except (KeyError, ValueError):
        raise CheckpointError(f"{path} has no readable keras_split header.") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {header.get('format')!r}; this version reads "
            f"format {FORMAT}."
        )
    return header, arrays


def values_of(group: str, variables) -> dict[str, np.ndarray]:
    return {f"{group}/{i}": np.asarray(v.numpy()) for i, v in enumerate(variables)}


def assign(group: str, variables, arrays: dict[str, np.ndarray], path) -> None:
    """Give `variables` the values saved under `group`, after checking all of them."""
    variables = list(variables)
    saved = sorted((k for k in arrays if k.startswith(group + "/")),
                   key=lambda k: int(k.rsplit("/", 1)[1]))
    if len(saved) != len(variables):
        raise CheckpointError(
            f"{path} holds {len(saved)} {group} variables, this party has {len(variables)}: "
            "it was written for a different model or optimizer. Use a new checkpoint "
            "directory, or the model the checkpoint was written for."
        )
    for key, variable in zip(saved, variables, strict=True):
        if tuple(arrays[key].shape) != tuple(variable.shape):
            raise CheckpointError(
                f"{path}: {group} variable {variable.path!r} has shape {tuple(variable.shape)}, "
                f"the checkpoint has {tuple(arrays[key].shape)}; it was written for a "
                "different model."
            )
    for key, variable in zip(saved, variables, strict=True):
        variable.assign(arrays[key])
