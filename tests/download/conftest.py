"""Fixtures for the download pipeline: a local file server, fast settings, real stores."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from impl.download.testserver import FileServer
from model import Config

FAST = {
    "backoff_base": 0.05,
    "backoff_cap": 0.5,
    "download_lease_ttl": 2.0,
    "download_max_retries": 2,
    "download_connect_timeout": 2.0,
    "download_read_timeout": 5.0,
}


@pytest.fixture
def cfg() -> Config:
    """Settings that keep retries and leases short."""
    return Config(**FAST)  # type: ignore[arg-type]


@pytest.fixture
def server() -> Iterator[FileServer]:
    """A fresh local file server on 127.0.0.1."""
    with FileServer() as srv:
        yield srv


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """The ledger database file for the test."""
    return tmp_path / "ledger.sqlite"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The output directory for the test."""
    return tmp_path / "out"


def write_manifest(path: Path, entries: list[dict[str, object]]) -> Path:
    """Write ``entries`` as a JSON Lines manifest at ``path`` and return it."""
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    return path
