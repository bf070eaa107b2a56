"""Large context goes to object storage; the message carries its URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from handoff.offload import OffloadError, load_blob, store_blob


def test_local_folder_round_trip_is_content_addressed(tmp_path: Path) -> None:
    data = b"transcript " * 100_000  # 1.1 MB: far too big for a stream entry
    url = store_blob(data, f"file://{tmp_path}/blobs", suffix=".txt")
    assert url.startswith("file://") and url.endswith(".txt")
    assert load_blob(url) == data
    assert store_blob(data, f"file://{tmp_path}/blobs", suffix=".txt") == url
    assert len(list((tmp_path / "blobs").iterdir())) == 1


def test_any_fsspec_url_works() -> None:
    url = store_blob(b"abc", "memory://wd-test")
    assert url.startswith("memory://wd-test/") and load_blob(url) == b"abc"


def test_missing_blob_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OffloadError, match="could not read blob"):
        load_blob(f"file://{tmp_path}/nope")
