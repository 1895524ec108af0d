"""The crash-safe HTTP download pipeline (CONTRACT section 5): ``jobledger download``.

Modules, one concept each:

* ``url``        URL canonicalisation rules (what the job key sees)
* ``manifest``   JSON Lines / plain URL list parsing and validation
* ``http``       the httpx client with timeouts, retries, limits, per-host slots
* ``stream``     streaming into a partial file, resuming with Range + If-Range
* ``cas``        the content-addressed object store and partial files under ``--out``
* ``index``      the artifact index (``index.sqlite``, exported as ``index.jsonl``)
* ``pipeline``   the ``download`` handler: the workflow's states and effects
* ``reconcile``  partial files and lost objects versus the ledger
* ``run``        ``download()``: plan, run workers, watch, summarise
* ``demo``       ``run_demo()``: kill workers mid-stream, resume, verify
* ``testserver`` a local Range-capable file server with scripted misbehaviour
"""

from __future__ import annotations

from impl.download.demo import DemoReport, run_demo
from impl.download.errors import (
    ArtifactMissing,
    ChecksumMismatch,
    DownloadError,
    HttpStatusError,
    ManifestError,
    RangeMismatch,
    TooLarge,
    TooManyRedirects,
    TransferError,
)
from impl.download.manifest import Manifest, ManifestEntry, parse_manifest
from impl.download.pipeline import DownloadHandler
from impl.download.reconcile import DiskReport, reconcile_disk
from impl.download.run import DownloadSummary, FailedArtifact, Progress, download
from impl.download.url import canonical_url

__all__ = [
    "ArtifactMissing",
    "ChecksumMismatch",
    "DemoReport",
    "DiskReport",
    "DownloadError",
    "DownloadHandler",
    "DownloadSummary",
    "FailedArtifact",
    "HttpStatusError",
    "Manifest",
    "ManifestEntry",
    "ManifestError",
    "Progress",
    "RangeMismatch",
    "TooLarge",
    "TooManyRedirects",
    "TransferError",
    "canonical_url",
    "download",
    "parse_manifest",
    "reconcile_disk",
    "run_demo",
]
