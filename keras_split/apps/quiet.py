"""A quiet start for the command line and the examples.

TensorFlow prints C++ log lines when it is imported and when it first looks
for devices ("oneDNN custom operations are on", "Could not find cuda drivers",
"failed call to cuInit: UNKNOWN ERROR (303)", and with float16 "oneDNN supports
DT_HALF only on platforms with AVX-512"), and its converters and tf.function
add warnings of their own. None of them is a failure of the user's command,
and the E-lines read as one. `quiet_tensorflow()`, called before anything
imports TensorFlow:

1. sets `TF_CPP_MIN_LOG_LEVEL=3` (TensorFlow reads it once, at import), unless
   the user set it: a user who sets it, or passes `--verbose`, sees everything;
2. imports TensorFlow with the process's stderr captured, and writes back
   every line that is not one of its start-up INFO/WARNING lines (those are
   printed before TensorFlow reads the variable, so the variable cannot stop
   them);
3. drops two Python-side warnings by their message: TensorFlow's "triggered
   tf.function retracing", which several parties of one process (a vertical
   split, a chain) trigger by design, and absl's "unsaved custom gradients"
   from the export's conversions.

Errors are never hidden: Python exceptions are untouched, and C++ error lines
printed during the captured import are written back. This module imports
neither TensorFlow nor Keras itself, so a command that needs neither
(`keras-split certs`) can use it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

# Lines that start a new log record: absl's C++ format ("I0000 00:00:17.1 123
# port.cc:153] ..."), its banner, LiteRT's "INFO: ..." lines, a Python warning.
_ABSL = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]*\] ")
_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_RECORD = re.compile(r"^(INFO|WARNING|ERROR): |^\S+:\d+: \w+: ")
# LiteRT says this once per process when an interpreter is created (export checks).
_LITERT_NOISE = ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)


def _is_noise(record: list[str]) -> bool:
    first = record[0]
    match = _ABSL.match(first)
    if match:
        return match.group(1) in "IW"  # errors and fatal errors are written back
    return first in (_BANNER, *_LITERT_NOISE)


def without_startup_noise(text: str) -> str:
    """`text` without TensorFlow's and LiteRT's INFO/WARNING log records.

    A record is a line that starts like a log line, with the lines after it that
    do not (a message on several lines). Everything else is kept, in order.
    """
    records: list[list[str]] = []
    for line in text.splitlines():
        starts = _ABSL.match(line) or line == _BANNER or _RECORD.match(line)
        if starts or not records:
            records.append([line])
        else:
            records[-1].append(line)
    kept = [line for record in records if not _is_noise(record) for line in record]
    return "".join(f"{line}\n" for line in kept)


@contextmanager
def filtered_stderr() -> Iterator[None]:
    """Capture what the process (C++ included) writes to stderr inside the block,
    then write it back without TensorFlow's start-up INFO/WARNING lines.

    For short, non-interactive blocks (an import, an export): what is written
    inside appears when the block ends. Where stderr is not a file descriptor
    (an embedding host), the block runs unfiltered.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = without_startup_noise(sink.read().decode("utf-8", "replace"))
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


class _DropKnownNoise(logging.Filter):
    """Python-side warnings that are noise for our commands, by message:

    - TensorFlow's "N out of the last M calls to <function> triggered
      tf.function retracing": each party of a vertical split or a chain compiles
      its own step from the same code, which is what the heuristic counts;
    - absl's "Importing a function (...) with ops with unsaved custom
      gradients": the export converts functions whose gradients it writes with
      forward ops itself, and never asks TensorFlow for those.
    """

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


_NOISE_BY_LOGGER = {
    "tensorflow": _DropKnownNoise("triggered tf.function retracing"),
    "absl": _DropKnownNoise("with ops with unsaved custom gradients"),
}


def _set_by_user(name: str) -> bool:
    # `import keras_split` sets a default for TF_CPP_MIN_LOG_LEVEL; it records
    # what the user had set before, when it does.
    import keras_split

    before = getattr(keras_split, "_user_environment", None)
    return name in (os.environ if before is None else before)


def quiet_tensorflow(verbose: bool = False) -> bool:
    """Start TensorFlow without its C++ start-up lines; see the module docstring.

    Call it before anything imports TensorFlow (the first statement of a
    script). `verbose=True` changes nothing, so every line shows.

    Returns:
        Whether the C++ log lines are quieted: False with `verbose`, or when
        the user set `TF_CPP_MIN_LOG_LEVEL` (they chose what to see). Callers
        use it to decide whether to filter later noisy steps too
        (`filtered_stderr`).
    """
    if verbose:
        return False
    try:
        # absl makes its logger of its own class when imported: let it, before
        # we ask for the logger by name (which would make a plain one first).
        import absl.logging  # noqa: F401
    except ImportError:
        pass
    for name, noise in _NOISE_BY_LOGGER.items():
        logging.getLogger(name).addFilter(noise)  # once: a logger's filters are a set
    if _set_by_user("TF_CPP_MIN_LOG_LEVEL"):
        return False  # the user chose what to see
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if "tensorflow" not in sys.modules:  # else too late: the setting is read at import
        with filtered_stderr():
            import tensorflow  # noqa: F401
    return True
