"""Download one file into a cache folder, checked against the publisher's MD5.

The file is streamed into `<name>.part` beside its final place while its MD5 is
computed, and renamed into place only when it arrived whole and its MD5 is the
published one. So the cache never holds a corrupt or partial file under the
real name, and a failed download leaves nothing behind.

`KERAS_SPLIT_OFFLINE=1` in the environment forbids every download (no
connection is attempted); loaders then read their cache only.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

OFFLINE_VARIABLE = "KERAS_SPLIT_OFFLINE"
CHUNK = 1 << 20


class DownloadError(ConnectionError):
    """A file could not be downloaded (offline, refused, interrupted, or not found).

    A `ConnectionError` (so an `OSError`): catch it to fall back to local data.

    Attributes:
        reason: the cause in a few words ("KERAS_SPLIT_OFFLINE is set",
            "HTTP 404 Not Found"), for a one-line note.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class ChecksumError(OSError):
    """A downloaded or cached file is not the published one (its MD5 differs)."""


def offline() -> bool:
    """Whether `KERAS_SPLIT_OFFLINE` forbids downloads (any value but "", "0" or "false")."""
    return os.environ.get(OFFLINE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def md5_of(path) -> str:
    """The MD5 of a file, as hex."""
    digest = hashlib.md5()  # noqa: S324 - a checksum against the publisher's, not security
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, path, md5: str, *, timeout: float = 60.0, what: str | None = None) -> Path:
    """Download `url` to `path`, checked against `md5`, unless `path` exists already.

    (A cached file is not re-checked here; `load_medmnist` checks it at every load.)

    Args:
        url: where to get the file (http, https or file).
        path: where it goes; its folder is created.
        md5: the publisher's MD5 of the file.
        timeout: seconds without data before the download is given up.
        what: how errors name the file (default: its name).

    Returns:
        `path`.

    Raises:
        DownloadError: offline (`KERAS_SPLIT_OFFLINE`), no connection, an HTTP
            error, or a download that stopped before the end.
        ChecksumError: the downloaded file's MD5 is not `md5` (nothing is kept).
    """
    path = Path(path)
    what = what or path.name
    if path.exists():
        return path
    hint = (f"Download {url} yourself and put it at {path} (MD5 {md5}), or use the shipped "
            "data offline (keras_split.datasets.load_pneumoniamnist_balanced()).")
    if offline():
        raise DownloadError(f"Cannot download {what}: {OFFLINE_VARIABLE} is set, so no "
                            f"download is attempted, and {path} does not exist. {hint}",
                            reason=f"{OFFLINE_VARIABLE} is set")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    digest = hashlib.md5()  # noqa: S324 - a checksum against the publisher's, not security
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            expected = response.headers.get("Content-Length")
            for chunk in iter(lambda: response.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
        if expected is not None and received != int(expected):
            raise DownloadError(f"The download of {what} from {url} stopped after {received:,} "
                                f"of {int(expected):,} bytes. Call again to retry. {hint}",
                                reason="the download was interrupted")
    except urllib.error.HTTPError as error:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"Cannot download {what} from {url}: HTTP {error.code} "
                            f"{error.reason}. {hint}",
                            reason=f"HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError,
            ConnectionError) as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, DownloadError):
            raise
        if received or isinstance(error, http.client.IncompleteRead):
            # The connection broke mid-file.
            raise DownloadError(f"The download of {what} from {url} was interrupted after "
                                f"{received:,} bytes ({error}). Call again to retry. {hint}",
                                reason="the download was interrupted") from None
        reason = getattr(error, "reason", error)
        raise DownloadError(f"Cannot download {what} from {url} (no internet connection?): "
                            f"{reason}. {hint}", reason=f"no connection: {reason}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if actual != md5:
        partial.unlink(missing_ok=True)
        raise ChecksumError(f"The download of {what} from {url} has MD5 {actual}, expected "
                            f"{md5}: it is not the published file (a proxy's error page, or "
                            "a changed file). Nothing was kept; call again to retry.")
    partial.replace(path)
    return path
