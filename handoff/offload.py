"""Offload large context to object storage and carry its URL in the stream message.

The default store is a local folder (``file://./.wd-data/blobs``); any fsspec URL (``s3://bucket/prefix``,
``memory://``...) works when the matching fsspec backend is installed. Blobs are content-addressed (SHA-256), so
storing the same bytes twice returns the same URL and a retried producer never duplicates data.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

import fsspec

from handoff.errors import HandoffError


class OffloadError(HandoffError):
    """A blob could not be stored or read."""


def _local_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
        # file://./relative/dir -> ./relative/dir (a convenience for local defaults)
        return parts.netloc + parts.path
    return url


def store_blob(data: bytes, base_url: str, suffix: str = "") -> str:
    """Store ``data`` under ``base_url`` and return the URL a message should carry."""
    name = hashlib.sha256(data).hexdigest() + suffix
    base = _local_path(base_url).rstrip("/")
    url = f"{base}/{name}"
    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if not fs.exists(path):
            with fs.open(path, "wb") as fh:
                fh.write(data)
    except (OSError, ValueError, ImportError) as exc:
        raise OffloadError(f"could not store blob at {url}: {exc}") from exc
    if "://" not in url:
        return "file://" + str(fs.unstrip_protocol(path)).removeprefix("file://")
    return url


def load_blob(url: str) -> bytes:
    """Read back a blob stored by :func:`store_blob`."""
    try:
        with fsspec.open(url, "rb") as fh:
            data: bytes = fh.read()
    except (OSError, ValueError, ImportError) as exc:
        raise OffloadError(f"could not read blob {url}: {exc}") from exc
    return data
