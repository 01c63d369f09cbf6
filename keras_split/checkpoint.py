"""Checkpoints at step boundaries: one file per party, replaced atomically and
checked before anything in it is used.

A checkpoint holds variable values (the model's, the optimizer's, metric
state) as raw numeric arrays and a JSON header (step counters, sessions, data
position, and where each array lies in the file). Nothing is unpickled, so a
checkpoint cannot carry code.

Layout (format 3): the 8-byte magic `KSPLITCK`, the header's length (8 bytes,
little endian), the UTF-8 JSON header, the arrays' bytes back to back, and last
the SHA-256 digest of everything before it (32 bytes). Reading, in order:

1. checks the magic and that the file is long enough for what it claims;
2. checks the digest, so a flipped byte anywhere (header, arrays, the length
   field) or a file cut short is refused before any of it is parsed;
3. checks every array's dtype, shape and extent against the file;
4. refuses NaN and inf in float arrays: a checkpoint of a healthy model never
   holds them, so they mean a file edited by someone who also recomputed the
   digest, or a bug. `write` refuses them too, so a diverged model never
   replaces the last good checkpoint.

Parties checkpoint after every step, so writing must be cheap: one buffer, one
write to a temporary file, one rename over the previous checkpoint. The rename
is atomic, so a crash at any instant leaves the old checkpoint or the new one,
never a torn file. That covers a killed process; to also survive the machine
losing power, pass `durable=True`, which flushes the file and its directory to
disk before returning (about 0.3 ms more per step on the development machine,
often much more on network disks). The digest costs about 0.5 ms per MiB.

Two pieces for a long-running party, used by the server:

- `FolderLock`: an exclusive lock on a checkpoint folder, so two servers (or
  two clients) never write the same checkpoint.
- `SessionStore`: one small checksummed file per session, so saving one
  session's state costs the same with 1 or 1000 idle sessions.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

FORMAT = 3
MAGIC = b"KSPLITCK"
# Numeric dtypes only (bool, integers, floats), as on the wire.
_KINDS = "biuf"
_DIGEST = 32  # bytes of SHA-256, the last bytes of every format-3 file
_PREFIX = 16  # magic and header length
_START_OVER = "Restore it from a backup, or delete the folder {folder} to start over."


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, or does not belong to this model or party."""


def write(path, header: dict, arrays: dict[str, np.ndarray], durable: bool = False) -> None:
    """Atomically replace `path` with `header` and `arrays`, checksummed.

    Args:
        path: the checkpoint file. It is replaced by a rename, so readers see
            the old file or the new one, never a mix.
        header: JSON-serialisable fields (step counters, sessions...). The keys
            `format` and `arrays` are the file's own.
        arrays: numeric arrays (bool, integers, floats) by name.
        durable: also flush the file and its folder to disk before returning,
            so the checkpoint survives power loss, not only a crash.

    Raises:
        CheckpointError: a float array holds NaN or inf. Nothing is written, so
            the previous checkpoint at `path` stays as it was.
    """
    path = Path(path)
    index, chunks, offset = [], [], 0
    for name, array in arrays.items():
        data = np.asarray(array)
        if data.dtype.kind not in _KINDS:
            raise CheckpointError(
                f"Cannot checkpoint array {name!r} of dtype {data.dtype} to {path}: "
                "checkpoints hold bool, integer and float arrays only.")
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise CheckpointError(
                f"Not writing the checkpoint {path}: array {name!r} holds NaN or inf, so "
                "training has diverged (try a lower learning rate, or clip gradients). "
                "The previous checkpoint is kept.")
        index.append([name, data.dtype.name, list(data.shape), offset, data.nbytes])
        chunks.append(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
        offset += data.nbytes
    encoded = json.dumps({"format": FORMAT, **header, "arrays": index}).encode()
    body = b"".join([MAGIC, struct.pack("<Q", len(encoded)), encoded, *chunks])
    _replace(path, body + hashlib.sha256(body).digest(), durable)


def _replace(path: Path, content: bytes, durable: bool) -> None:
    """Write `content` to a temporary file beside `path`, then rename it over `path`."""
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as f:
        f.write(content)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(temporary, path)
    if durable:
        _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename, an unlink) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a checkpoint written by `write`: (header, arrays).

    Everything is checked before anything is returned: the digest over the
    whole file, every array's place in it, and that float arrays are finite.

    Raises:
        CheckpointError: the file is missing, unreadable, damaged, cut short,
            of another format, or holds NaN or inf. The message names the file.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"Cannot read the checkpoint {path}: {error}") from None
    if len(blob) < _PREFIX or blob[:8] != MAGIC:
        raise CheckpointError(f"{path} is not a readable keras_split checkpoint: it does "
                              f"not start with {MAGIC!r}. Point the party at its own "
                              "checkpoint folder, or delete this file to start over.")
    (length,) = struct.unpack("<Q", blob[8:_PREFIX])
    view = memoryview(blob)
    if len(blob) < _PREFIX + length + _DIGEST or (
            hashlib.sha256(view[:-_DIGEST]).digest() != blob[-_DIGEST:]):
        raise CheckpointError(_damaged(path, blob, length))
    try:
        header = json.loads(blob[_PREFIX:_PREFIX + length].decode())
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has no readable keras_split header, though its "
                              "checksum matches: it was not written by keras_split. "
                              + _START_OVER.format(folder=path.parent))
    found = header.get("format")
    if found != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {found!r}; this version of keras_split reads "
            f"format {FORMAT}. Use the keras_split version that wrote it, or delete the "
            f"folder {path.parent} to start over.")
    payload = view[_PREFIX + length:-_DIGEST]
    arrays = {}
    entries = header.pop("arrays", [])
    if not isinstance(entries, list):
        raise CheckpointError(f"{path}: malformed array index {entries!r}.")
    for entry in entries:
        name, values = _array(entry, payload, path)
        arrays[name] = values
    return header, arrays


def _damaged(path: Path, blob: bytes, length: int) -> str:
    """Why a file with our magic failed its length or digest check, as an error message."""
    start_over = _START_OVER.format(folder=path.parent)
    found, extent = _claims(blob, length)
    if isinstance(found, int) and found < FORMAT and len(blob) == _PREFIX + length + extent:
        return (f"{path} was written by an older keras_split (checkpoint format {found}, "
                f"without a checksum); this version reads format {FORMAT}. Finish that run "
                f"with the version that wrote it, or delete the folder {path.parent} to "
                "start over.")
    expected = _PREFIX + length + (extent or 0) + _DIGEST
    if len(blob) < expected:
        return (f"The checkpoint {path} is cut short: it has {len(blob)} bytes, its header "
                f"claims {expected if extent is not None else f'at least {expected}'}. It was "
                f"truncated after it was written (a full disk, an interrupted copy). "
                f"{start_over}")
    return (f"The checkpoint {path} is damaged: its SHA-256 checksum does not match its "
            f"{len(blob)} bytes, so it was changed or truncated after it was written (a disk "
            f"error, an interrupted copy, or an edit). Nothing in it was used. {start_over}")


def _claims(blob: bytes, length: int) -> tuple[object, int | None]:
    """What a header that cannot be trusted yet claims: (format, bytes of arrays), or
    None for what cannot be read."""
    try:
        header = json.loads(blob[_PREFIX:_PREFIX + length].decode())
        found = header.get("format")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None, None
    try:
        return found, sum(int(entry[4]) for entry in header["arrays"])
    except (TypeError, ValueError, KeyError, IndexError):
        return found, None


def _array(entry, payload, path) -> tuple[str, np.ndarray]:
    try:
        name, dtype, shape, offset, nbytes = entry
        dtype = np.dtype(dtype).newbyteorder("<")
        shape = tuple(int(d) for d in shape)
        offset, nbytes = int(offset), int(nbytes)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: malformed array entry {entry!r}.") from None
    if (dtype.kind not in _KINDS or any(d < 0 for d in shape) or offset < 0
            or nbytes != math.prod(shape) * dtype.itemsize or offset + nbytes > len(payload)):
        raise CheckpointError(f"{path}: array {name!r} does not fit the file.")
    values = np.frombuffer(payload[offset:offset + nbytes], dtype=dtype).reshape(shape)
    values = values.astype(dtype.name)
    if dtype.kind == "f" and not np.isfinite(values).all():
        raise CheckpointError(
            f"{path}: array {name!r} holds NaN or inf, which a checkpoint of a healthy model "
            "never does (keras_split refuses to write one), so the file was edited. "
            + _START_OVER.format(folder=Path(path).parent))
    return str(name), values


def cut_of(specs) -> list:
    """The cut as a checkpoint header records it: [[dtype, shape], ...]."""
    return [[s.dtype, list(s.shape)] for s in specs]


def read_for(path, party: str, specs) -> tuple[dict, dict[str, np.ndarray]]:
    """`read`, checking the checkpoint was written by this party for this cut."""
    header, arrays = read(path)
    cut = cut_of(specs)
    if header.get("party") != party or header.get("cut") != cut:
        raise CheckpointError(f"{path} was not written by a {party} with this cut ({cut}); "
                              "use another checkpoint directory.")
    return header, arrays


def values_of(group: str, variables) -> dict[str, np.ndarray]:
    """The values of `variables` as checkpoint arrays named `group/0`, `group/1`..."""
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


# -- one owner per folder ----------------------------------------------------------


class FolderLock:
    """An exclusive lock on a checkpoint folder, held for the life of its owner.

    Two parties writing one checkpoint folder would overwrite each other's
    checkpoints at every step, and a restart would resume from a mix. Take this
    lock before reading or writing anything in the folder, and keep it until
    the party stops; a second owner, in another process or in this one, is
    refused at once instead of waiting.

    The lock is `fcntl.flock` on `<folder>/.lock`, so the operating system
    releases it when the holding process exits, however it dies (SIGKILL
    included): a stale lock never blocks a restart. The file stays behind and
    holds the pid and role of the last owner, for the error message. A child
    forked while the lock is held shares it; start subprocesses with exec (the
    default for `subprocess`), which does not carry the descriptor over. POSIX
    only (uses `fcntl`); on a network file system, flock is only as good as
    the file system's support for it.

    Args:
        folder: the checkpoint folder; created if missing.
        owner: what holds it, for the message another owner gets ("server",
            "client").

    Example:

    ```python
    lock = FolderLock(checkpoint_dir, owner="server").acquire()
    try:
        ...  # read, then write checkpoints in checkpoint_dir
    finally:
        lock.release()

    # or
    with FolderLock(checkpoint_dir, owner="client"):
        ...
    ```
    """

    def __init__(self, folder, owner: str = "server"):
        self.folder = Path(folder)
        self.owner = owner
        self._descriptor: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / ".lock"

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._descriptor is not None

    def acquire(self) -> FolderLock:
        """Take the lock, or raise `CheckpointError` at once if another owner holds it.

        Returns:
            This lock, so `lock = FolderLock(folder).acquire()` reads naturally.
        """
        if self._descriptor is not None:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise CheckpointError(f"Cannot lock the checkpoint folder {self.folder}: {error}. "
                                  "Give the party a folder it can write.") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(
                    f"Cannot lock the checkpoint folder {self.folder}: {error}. Use a "
                    "folder on a local disk.") from None
            raise CheckpointError(
                f"The checkpoint folder {self.folder} is in use: another server or client "
                f"({holder or 'unknown owner'}) holds its lock ({self.path}). Two parties "
                "writing one folder would overwrite each other's checkpoints. Stop the "
                "other one, or give this one its own checkpoint folder.") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{self.owner} pid {os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        """Let the lock go (closing the file releases it); safe to call twice."""
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            os.close(descriptor)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"FolderLock({str(self.folder)!r}, owner={self.owner!r}, "
                f"{'held' if self.held else 'not held'})")


def _read_holder(descriptor: int) -> str:
    try:
        return os.pread(descriptor, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


# -- one file per session -------------------------------------------------------------


_SESSION_ID = re.compile(r"[0-9a-f]{1,64}")
_RECORD = ".session"


class SessionStore:
    """Per-session records (a header and a blob), one small checksummed file each.

    A server keeps, for each session, a few counters and the reply it last
    sent (so a client that retries a step gets the same answer). Rewriting all
    of them in one checkpoint after every step makes a step cost grow with the
    number of idle sessions; here `put` writes only the session that changed,
    so its cost depends on that session's record alone.

    Each record is a format-3 checkpoint (see `write`): replaced atomically,
    with a SHA-256 digest checked by `load_all`, and bound to its session id
    (a record copied to another id's file is refused). Give the store its own
    folder (e.g. `checkpoint_dir / "sessions"`), and hold a `FolderLock` on
    the checkpoint folder while using it: the store itself does not lock.

    Consistency with the party's own checkpoint: a record and the checkpoint
    are two files, so a crash can fall between their writes, and neither order
    alone is safe (a reply saved for a step whose weights were not saved would
    be replayed instead of recomputed; weights saved without their reply
    would be updated twice when the client resends). One recipe: keep a
    counter of weight updates in the checkpoint's header; `put` the record
    first, holding the counter after its step and the session's counters from
    before it; then `write` the checkpoint. On restart, a record whose counter
    is ahead of the checkpoint's belongs to a step whose weights were lost:
    use its earlier counters and drop its reply, and the client resends that
    step.

    Args:
        folder: where the records live, `<folder>/<session_id>.session`;
            created if missing.
        durable: like `write`'s: flush each record (and removal) to disk.

    Example:

    ```python
    store = SessionStore(checkpoint_dir / "sessions", durable=False)
    store.put("3f9a", {"client_id": "a", "last_step": 7}, reply.SerializeToString())
    store.remove("3f9a")
    for session_id, (header, blob) in store.load_all().items():
        ...
    ```
    """

    def __init__(self, folder, durable: bool = False):
        self.folder = Path(folder)
        self.durable = durable
        self.folder.mkdir(parents=True, exist_ok=True)

    def path_of(self, session_id: str) -> Path:
        """The file that holds `session_id`'s record."""
        return self.folder / f"{_checked_id(session_id)}{_RECORD}"

    def put(self, session_id: str, header: dict, blob: bytes) -> None:
        """Replace `session_id`'s record with `header` (JSON-serialisable) and `blob`.

        Writes one file of about `len(blob)` bytes plus the header, whatever
        the number of other sessions.
        """
        path = self.path_of(session_id)
        data = np.frombuffer(blob, np.uint8)
        write(path, {"session": session_id, "fields": header}, {"blob": data},
              durable=self.durable)

    def remove(self, session_id: str) -> None:
        """Delete `session_id`'s record; nothing happens if there is none."""
        path = self.path_of(session_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        if self.durable:
            _sync_folder(self.folder)

    def load_all(self) -> dict[str, tuple[dict, bytes]]:
        """Every record, checked: {session_id: (header, blob)}.

        Files that are not records (the lock, a `.partial` file left by a crash
        during `put`) are skipped.

        Raises:
            CheckpointError: a record is damaged, truncated, of another format,
                or holds another session's id; the message names its file.
        """
        records = {}
        for path in sorted(self.folder.iterdir()):
            if not path.name.endswith(_RECORD) or not path.is_file():
                continue
            session_id = path.name[:-len(_RECORD)]
            if not _SESSION_ID.fullmatch(session_id):
                continue  # not a name put() writes
            header, arrays = read(path)
            fields, blob = header.get("fields"), arrays.get("blob")
            if (header.get("session") != session_id or not isinstance(fields, dict)
                    or blob is None or blob.dtype != np.uint8 or blob.ndim != 1):
                raise CheckpointError(
                    f"{path} is not the session record of {session_id!r} (it holds "
                    f"{header.get('session')!r}): it was renamed or copied by hand. Remove "
                    "it, or delete the folder to start over.")
            records[session_id] = (fields, blob.tobytes())
        return records

    def __repr__(self) -> str:
        return f"SessionStore({str(self.folder)!r}, durable={self.durable})"


def _checked_id(session_id) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise ValueError(f"Invalid session id {session_id!r}: expected 1 to 64 lowercase "
                         "hex digits (as the server generates them).")
    return session_id
