"""Checkpoint files: every damaged or edited byte is refused, one folder has one
owner, and saving one session costs the same however many others exist."""

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_split import checkpoint
from keras_split.checkpoint import CheckpointError, FolderLock, SessionStore

# -- a real checkpoint -----------------------------------------------------------------


@pytest.fixture
def state(rng):
    """A small model's state after one training step: weights, Adam's slots and
    iteration counter, and running metrics (floats and integers)."""
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["sparse_categorical_accuracy"])
    model.train_on_batch(rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, 8))
    metrics = [v for metric in model.metrics for v in metric.variables]
    arrays = {**checkpoint.values_of("model", model.variables),
              **checkpoint.values_of("optimizer", model.optimizer.variables),
              **checkpoint.values_of("metrics", metrics)}
    assert {a.dtype.kind for a in arrays.values()} >= {"f", "i"}  # Adam's iteration is an int
    header = {"party": "server", "cut": [["float32", [None, 4]]], "step": 1,
              "sessions": {"ab12": {"client_id": "a", "last_step": 1, "last_train_step": 1}}}
    return header, arrays


@pytest.fixture
def saved(tmp_path, state):
    path = tmp_path / "server.ckpt"
    checkpoint.write(path, *state)
    return path


def _read_refused(path, match=None):
    with pytest.raises(CheckpointError, match=match) as caught:
        checkpoint.read(path)
    assert str(path) in str(caught.value)
    return str(caught.value)


def test_a_checkpoint_round_trips(tmp_path, state):
    header, arrays = state
    path = tmp_path / "party.ckpt"
    checkpoint.write(path, header, arrays, durable=True)
    read_header, read_arrays = checkpoint.read(path)
    assert read_header == {"format": checkpoint.FORMAT, **header}
    assert read_arrays.keys() == arrays.keys()
    for name, array in arrays.items():
        assert read_arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(read_arrays[name], array)
    assert not path.with_name("party.ckpt.partial").exists()


def test_every_single_byte_flip_is_refused(saved):
    blob = saved.read_bytes()
    (length,) = struct.unpack("<Q", blob[8:16])
    rng = np.random.default_rng(7)
    # Every region by name (magic, length, header, arrays, digest), then random places.
    positions = [0, 7, 8, 12, 15, 16, 16 + length // 2, 16 + length - 1, 16 + length,
                 len(blob) - 33, len(blob) - 32, len(blob) - 1]
    positions += rng.integers(0, len(blob), 40).tolist()
    for position in positions:
        damaged = bytearray(blob)
        damaged[position] ^= int(rng.integers(1, 256))
        saved.write_bytes(damaged)
        _read_refused(saved)
    saved.write_bytes(blob)
    checkpoint.read(saved)  # the original still reads


def test_a_truncated_checkpoint_is_refused(saved):
    blob = saved.read_bytes()
    for tenth in range(10):
        saved.write_bytes(blob[:len(blob) * tenth // 10])
        _read_refused(saved, "cut short" if tenth else "not a readable keras_split checkpoint")
    saved.write_bytes(blob[:-1])
    _read_refused(saved, rf"cut short: it has {len(blob) - 1} bytes, its header claims {len(blob)}")
    saved.write_bytes(blob + b"\0")  # an appended byte moves the digest too
    _read_refused(saved, "damaged")


def test_the_error_says_what_to_do(saved):
    blob = bytearray(saved.read_bytes())
    blob[-100] ^= 1
    saved.write_bytes(blob)
    message = _read_refused(saved)
    assert "checksum does not match" in message
    assert f"delete the folder {saved.parent} to start over" in message


def _weight_offset(blob, name):
    """Where array `name` starts in a checkpoint file."""
    (length,) = struct.unpack("<Q", blob[8:16])
    index = json.loads(blob[16:16 + length])["arrays"]
    offset = next(entry[3] for entry in index if entry[0] == name)
    return 16 + length + offset


def test_a_nan_weight_is_refused_with_or_without_a_new_digest(saved):
    blob = bytearray(saved.read_bytes())
    at = _weight_offset(blob, "model/0")
    blob[at:at + 4] = np.float32(np.nan).tobytes()
    saved.write_bytes(blob)
    _read_refused(saved, "checksum does not match")
    # An attacker who recomputes the digest is stopped by the finiteness check.
    blob[-32:] = hashlib.sha256(bytes(blob[:-32])).digest()
    saved.write_bytes(blob)
    _read_refused(saved, r"array 'model/0' holds NaN or inf")
    blob[at:at + 4] = np.float32(-np.inf).tobytes()
    blob[-32:] = hashlib.sha256(bytes(blob[:-32])).digest()
    saved.write_bytes(blob)
    _read_refused(saved, "NaN or inf")


def test_an_edited_session_counter_is_refused(saved):
    blob = saved.read_bytes()
    edited = blob.replace(b'"last_step": 1', b'"last_step": 9')
    assert edited != blob and len(edited) == len(blob)
    saved.write_bytes(edited)
    _read_refused(saved, "checksum does not match")


def test_write_refuses_nan_and_keeps_the_previous_checkpoint(saved, state):
    header, arrays = state
    before = saved.read_bytes()
    diverged = {**arrays, "model/1": np.full_like(arrays["model/1"], np.nan)}
    with pytest.raises(CheckpointError, match=r"Not writing the checkpoint .*'model/1' holds "
                                              r"NaN or inf.*previous checkpoint is kept"):
        checkpoint.write(saved, {**header, "step": 2}, diverged)
    assert saved.read_bytes() == before
    with pytest.raises(CheckpointError, match="bool, integer and float arrays only"):
        checkpoint.write(saved, header, {"names": np.array(["a", "b"])})


def _write_format_2(path, header, arrays):
    """The writer of keras_split before checksums, verbatim."""
    index, chunks, offset = [], [], 0
    for name, array in arrays.items():
        data = np.asarray(array)
        index.append([name, data.dtype.name, list(data.shape), offset, data.nbytes])
        chunks.append(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
        offset += data.nbytes
    encoded = json.dumps({"format": 2, **header, "arrays": index}).encode()
    path.write_bytes(b"KSPLITCK" + struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))


def test_an_older_format_is_named(tmp_path, state):
    path = tmp_path / "server.ckpt"
    _write_format_2(path, *state)
    _read_refused(path, r"written by an older keras_split \(checkpoint format 2, without a "
                        r"checksum\); this version reads format 3")


def test_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "server.ckpt"
    path.write_bytes(b"PK\x03\x04 not really")
    _read_refused(path, "is not a readable keras_split checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read the checkpoint"):
        checkpoint.read(tmp_path / "missing.ckpt")


# -- one owner per folder -----------------------------------------------------------------


def test_a_folder_lock_is_exclusive_in_one_process(tmp_path):
    folder = tmp_path / "checkpoints"
    first = FolderLock(folder, owner="server").acquire()
    assert first.held and folder.is_dir()
    in_use = rf"The checkpoint folder {re.escape(str(folder))} is in use: another server or "
    with pytest.raises(CheckpointError, match=in_use + rf"client \(server pid {os.getpid()}\)"):
        FolderLock(folder, owner="client").acquire()
    first.acquire()  # taking a lock one holds is a no-op
    first.release()
    first.release()
    assert not first.held
    with FolderLock(folder, owner="client") as second:
        assert second.held
        with pytest.raises(CheckpointError, match="in use"), FolderLock(folder):
            pass
    assert not second.held
    FolderLock(folder).acquire().release()


# The module alone, without importing TensorFlow through keras_split (seconds per process).
_LOAD = textwrap.dedent(f"""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("checkpoint", {checkpoint.__file__!r})
    checkpoint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checkpoint)
""")

_HOLD = _LOAD + textwrap.dedent("""
    import time
    checkpoint.FolderLock(sys.argv[1], owner="other-server").acquire()
    print("locked", flush=True)
    time.sleep(600)
""")

_TRY = _LOAD + textwrap.dedent("""
    try:
        checkpoint.FolderLock(sys.argv[1]).acquire()
    except checkpoint.CheckpointError as error:
        print("refused:", error)
    else:
        print("acquired")
""")


def test_a_folder_lock_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path):
    folder = tmp_path / "checkpoints"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        in_use = rf"{re.escape(str(folder))} is in use: another server or client"
        with pytest.raises(CheckpointError, match=in_use + rf" \(other-server pid {holder.pid}\)"):
            FolderLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
        holder.wait()
        holder.stdout.close()
    with FolderLock(folder, owner="server"):
        tried = subprocess.run([sys.executable, "-c", _TRY, str(folder)], capture_output=True,
                               text=True, timeout=120, check=True)
        assert tried.stdout.startswith(f"refused: The checkpoint folder {folder} is in use")
    tried = subprocess.run([sys.executable, "-c", _TRY, str(folder)], capture_output=True,
                           text=True, timeout=120, check=True)
    assert tried.stdout.strip() == "acquired"


# -- one file per session -------------------------------------------------------------------


def test_session_records_round_trip(tmp_path):
    store = SessionStore(tmp_path / "sessions", durable=True)
    assert store.load_all() == {}
    store.put("ab12", {"client_id": "a", "last_step": 3}, b"reply-3")
    store.put("ff", {"client_id": "b", "last_step": 0}, b"")
    store.put("ab12", {"client_id": "a", "last_step": 4}, bytearray(b"reply-4"))
    assert SessionStore(tmp_path / "sessions").load_all() == {
        "ab12": ({"client_id": "a", "last_step": 4}, b"reply-4"),
        "ff": ({"client_id": "b", "last_step": 0}, b""),
    }
    store.remove("ff")
    store.remove("ff")  # already gone: nothing to do
    assert list(store.load_all()) == ["ab12"]
    # What a crash during put leaves behind, and the folder's lock, are not records.
    store.path_of("cd").with_name("cd.session.partial").write_bytes(b"half")
    FolderLock(store.folder).acquire().release()
    assert list(store.load_all()) == ["ab12"]


@pytest.mark.parametrize("session_id", ["", "AB12", "../server", "a/b", "ab.session", "a" * 65,
                                        12, None, "ab\n"])
def test_session_ids_are_checked(tmp_path, session_id):
    store = SessionStore(tmp_path)
    with pytest.raises(ValueError, match="Invalid session id"):
        store.put(session_id, {}, b"x")
    with pytest.raises(ValueError, match="Invalid session id"):
        store.remove(session_id)


def _bytes_written() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def _files(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.iterdir()}


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_saving_one_session_does_not_depend_on_the_others(tmp_path):
    reply = os.urandom(64 * 1024)
    written, touched = {}, {}
    for others in (1, 200):
        store = SessionStore(tmp_path / f"with-{others}")
        for i in range(others):
            store.put(f"{i:x}0", {"client_id": str(i), "last_step": 5}, reply)
        before, files = _bytes_written(), _files(store.folder)
        store.put("abc", {"client_id": "me", "last_step": 6}, reply)
        written[others] = _bytes_written() - before
        after = _files(store.folder)
        touched[others] = {name for name in after if after[name] != files.get(name)}
        assert set(files) <= set(after)
    # One record, about the size of its reply, whatever the number of others.
    assert touched[1] == touched[200] == {"abc.session"}
    assert len(reply) <= written[1] < len(reply) + 4096
    assert abs(written[200] - written[1]) < 1024


def test_a_damaged_session_record_is_refused(tmp_path):
    store = SessionStore(tmp_path)
    store.put("ab12", {"client_id": "a", "last_step": 3}, b"reply" * 100)
    store.put("cd34", {"client_id": "b", "last_step": 1}, b"other")
    path = store.path_of("ab12")
    blob = path.read_bytes()
    for position in np.random.default_rng(3).integers(0, len(blob), 20):
        damaged = bytearray(blob)
        damaged[position] ^= 0x40
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            store.load_all()
    path.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is cut short: it has "
                                              rf"{len(blob) // 2} bytes, its header claims "
                                              rf"{len(blob)}\."):
        store.load_all()
    # An intact record under another session's name: copied or renamed by hand.
    path.write_bytes(store.path_of("cd34").read_bytes())
    copied = rf"{re.escape(str(path))} is not the session record of 'ab12' \(it holds 'cd34'\)"
    with pytest.raises(CheckpointError, match=copied):
        store.load_all()
