"""Manifests: the list of artifacts a ``download`` run plans, parsed and validated up front.

Two formats, told apart by the first line that is neither blank nor a ``#`` comment:

* **JSON Lines** (that line starts with ``{``): one object per line with ``work_id``,
  ``artifact_id`` and ``url`` (strings), and optionally ``sha256`` (64 hex digits: the
  bytes are checked against it), ``priority`` (an integer: higher is leased first) and any
  other fields, kept as the job's ``extras``.
* **A plain URL list**: one URL per line. ``work_id`` and ``artifact_id`` are both
  ``"url-"`` plus the first 32 hex digits of the SHA-256 of the canonical URL.

Blank lines and lines starting with ``#`` are skipped in both. Every line is validated
before anything is planned: a bad line raises :class:`ManifestError` naming the file and
the line, unless ``skip_invalid=True``, which collects the errors and keeps the rest.

The job identity is ``{work_id, artifact_id, canonical_url}``; the payload holds only
``sha256`` and ``extras``, so rewriting a URL in another spelling does not change the job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from attrs import field, frozen

from impl.download.errors import ManifestError
from impl.download.url import canonical_url, url_hash
from model.errors import InvalidInput
from model.key import Scalar, canon
from model.record import JSON, Plan

ID_MAX_CHARS = 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KNOWN = frozenset({"work_id", "artifact_id", "url", "sha256", "priority"})


@frozen
class ManifestEntry:
    """One artifact to download, as validated from one manifest line."""

    work_id: str
    artifact_id: str
    url: str
    canonical_url: str
    line: int
    sha256: str | None = None
    priority: int = 0
    extras: dict[str, JSON] = field(factory=dict)

    def identity(self) -> dict[str, Scalar]:
        """Return the job identity ``{work_id, artifact_id, canonical_url}``."""
        return {
            "work_id": self.work_id,
            "artifact_id": self.artifact_id,
            "canonical_url": self.canonical_url,
        }

    def payload(self) -> JSON:
        """Return the job payload: the expected hash and the extras (None when both empty)."""
        if self.sha256 is None and not self.extras:
            return None
        return {"sha256": self.sha256, "extras": self.extras}

    def plan(self) -> Plan:
        """Return the ``Plan`` item that plans this entry."""
        return Plan(self.identity(), payload=self.payload(), priority=self.priority)


@frozen
class Manifest:
    """A parsed manifest: the valid entries in file order and the errors that were skipped."""

    path: str
    entries: tuple[ManifestEntry, ...]
    invalid: tuple[ManifestError, ...] = ()


def _text_id(obj: dict[str, object], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{key!r} must be a non-empty string, got {value!r}")
    if len(value) > ID_MAX_CHARS:
        raise InvalidInput(f"{key!r} is {len(value)} characters long; the limit is {ID_MAX_CHARS}")
    return value


def _json_entry(text: str, line: int) -> ManifestEntry:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"expected a JSON object, got {type(obj).__name__}")
    work_id = _text_id(obj, "work_id")
    artifact_id = _text_id(obj, "artifact_id")
    url = obj.get("url")
    if not isinstance(url, str):
        raise InvalidInput(f"'url' must be a string, got {url!r}")
    canonical = canonical_url(url)
    sha = obj.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha.lower())):
        raise InvalidInput(f"'sha256' must be 64 hex digits, got {sha!r}")
    priority = obj.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidInput(f"'priority' must be an integer, got {priority!r}")
    extras: dict[str, JSON] = {k: v for k, v in obj.items() if k not in _KNOWN}
    try:
        canon(extras)
    except ValueError as exc:
        raise InvalidInput(f"extra fields cannot be stored as JSON ({exc})") from None
    return ManifestEntry(
        work_id=work_id,
        artifact_id=artifact_id,
        url=url,
        canonical_url=canonical,
        line=line,
        sha256=sha.lower() if isinstance(sha, str) else None,
        priority=priority,
        extras=extras,
    )


def _url_entry(text: str, line: int) -> ManifestEntry:
    canonical = canonical_url(text)
    derived = "url-" + url_hash(canonical)[:32]
    return ManifestEntry(
        work_id=derived, artifact_id=derived, url=text, canonical_url=canonical, line=line
    )


def parse_lines(
    lines: Iterable[str], *, path: str = "<manifest>", skip_invalid: bool = False
) -> Manifest:
    """Parse manifest ``lines`` (without or with trailing newlines).

    Entries with the same identity and payload are merged into one (the first line
    wins); the same identity with another ``sha256`` or extras is an error on the later
    line, because one job cannot have two payloads.

    Raises:
        ManifestError: for the first bad line, unless ``skip_invalid``.
    """
    entries: list[ManifestEntry] = []
    invalid: list[ManifestError] = []
    seen: dict[bytes, ManifestEntry] = {}
    json_lines: bool | None = None
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if json_lines is None:
            json_lines = text.startswith("{")
        try:
            entry = _json_entry(text, number) if json_lines else _url_entry(text, number)
            key = canon(entry.identity())
            earlier = seen.get(key)
            if earlier is not None:
                if canon(earlier.payload()) != canon(entry.payload()):
                    raise InvalidInput(
                        f"same work_id, artifact_id and URL as line {earlier.line} but a "
                        "different sha256 or extra fields"
                    )
                continue
        except InvalidInput as exc:
            error = ManifestError(path, number, str(exc))
            if not skip_invalid:
                raise error from None
            invalid.append(error)
            continue
        seen[key] = entry
        entries.append(entry)
    return Manifest(path=path, entries=tuple(entries), invalid=tuple(invalid))


def parse_manifest(path: str | os.PathLike[str], *, skip_invalid: bool = False) -> Manifest:
    """Read and parse the manifest file at ``path`` (UTF-8).

    Raises:
        ManifestError: for a bad line (file and line number in the message), or when
            the file cannot be read or decoded.
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError(name, 0, f"cannot read the manifest ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError(name, line, f"the line is not UTF-8 ({exc.reason})") from None
    # Lines end at "\n" only: str.splitlines would also break a JSON line at a U+2028 or
    # U+0085 inside a string (JSON allows both raw) and miscount every later line number.
    return parse_lines(text.split("\n"), path=name, skip_invalid=skip_invalid)
