"""Manifests: both formats, validation before planning, line numbers in errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from impl.download.errors import ManifestError
from impl.download.manifest import parse_lines, parse_manifest
from impl.download.run import download
from model import Config, MemoryStore
from model.errors import InvalidInput
from tests.download.conftest import write_manifest


def test_json_lines_entries_keep_ids_and_canonicalise_the_url() -> None:
    manifest = parse_lines(
        [
            "# comment",
            "",
            json.dumps(
                {
                    "work_id": "w1",
                    "artifact_id": "a1",
                    "url": "HTTP://Host:80/x#f",
                    "sha256": "AB" * 32,
                    "priority": 3,
                    "note": "kept",
                }
            ),
        ]
    )
    (entry,) = manifest.entries
    assert entry.identity() == {
        "work_id": "w1",
        "artifact_id": "a1",
        "canonical_url": "http://host/x",
    }
    assert entry.line == 3
    assert entry.priority == 3
    assert entry.payload() == {"sha256": "ab" * 32, "extras": {"note": "kept"}}


def test_plain_url_list_derives_ids_from_the_canonical_url() -> None:
    manifest = parse_lines(["http://h/a", "# skipped", "", "HTTP://H:80/a#x", "http://h/b"])
    first, second = manifest.entries  # the second spelling of /a is the same entry
    assert first.work_id == first.artifact_id
    assert first.work_id.startswith("url-")
    assert len(first.work_id) == 36
    assert second.canonical_url == "http://h/b"
    assert first.payload() is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"work_id": "w", "artifact_id": "a"}', "'url' must be a string"),
        ('{"work_id": "", "artifact_id": "a", "url": "http://h/"}', "'work_id'"),
        ('{"work_id": "w", "artifact_id": "a", "url": "ftp://h/"}', "only http and https"),
        ('{"work_id": "w", "artifact_id": "a", "url": "http://h/", "sha256": "xyz"}', "sha256"),
        ('{"work_id": "w", "artifact_id": "a", "url": "http://h/", "priority": 1.5}', "priority"),
    ],
)
def test_a_bad_json_line_names_file_and_line(line: str, reason: str) -> None:
    good = '{"work_id": "w", "artifact_id": "ok", "url": "http://h/ok"}'
    with pytest.raises(ManifestError, match=reason) as info:
        parse_lines([good, line], path="m.jsonl")
    assert info.value.line == 2
    assert str(info.value).startswith("m.jsonl:2: ")
    assert isinstance(info.value, InvalidInput)


def test_same_identity_with_another_payload_is_an_error_on_the_later_line() -> None:
    a = {"work_id": "w", "artifact_id": "a", "url": "http://h/"}
    with pytest.raises(ManifestError, match="line 1") as info:
        parse_lines([json.dumps(a), json.dumps({**a, "sha256": "0" * 64})])
    assert info.value.line == 2


def test_skip_invalid_collects_errors_and_keeps_the_rest() -> None:
    manifest = parse_lines(["http://h/a", "ftp://h/b", "http://h/c"], skip_invalid=True)
    assert [e.canonical_url for e in manifest.entries] == ["http://h/a", "http://h/c"]
    assert [e.line for e in manifest.invalid] == [2]


def test_unreadable_manifest_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        parse_manifest(tmp_path / "absent.jsonl")


def test_non_utf8_manifest_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "m.txt"
    path.write_bytes(b"http://h/a\nhttp://h/\xff\n")
    with pytest.raises(ManifestError, match=r"m\.txt:2: ") as info:
        parse_manifest(path)
    assert info.value.line == 2


def test_a_line_ends_only_at_a_newline(tmp_path: Path) -> None:
    # U+2028, U+0085, form feed and a lone CR are line breaks to str.splitlines, but JSON
    # allows them raw inside a string, and a manifest line ends only at "\n".
    work_id = "w\u2028x\u0085y\x0cz\rq"
    path = tmp_path / "m.jsonl"
    line = json.dumps(
        {"work_id": work_id, "artifact_id": "a", "url": "http://h/a"}, ensure_ascii=False
    )
    path.write_text(f"{line}\r\nftp://h/b\n", encoding="utf-8", newline="")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: "):
        parse_manifest(path)
    path.write_text(f"{line}\r\n", encoding="utf-8", newline="")
    (entry,) = parse_manifest(path).entries
    assert (entry.work_id, entry.line) == (work_id, 1)


def test_download_with_a_bad_line_plans_nothing(tmp_path: Path, cfg: Config) -> None:
    """Validation happens before planning: a typo on line 3 must not leave 2 jobs behind."""
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        [
            {"work_id": "w", "artifact_id": "a", "url": "http://127.0.0.1:9/a"},
            {"work_id": "w", "artifact_id": "b", "url": "http://127.0.0.1:9/b"},
            {"work_id": "w", "artifact_id": "c", "url": "gopher://x/"},
        ],
    )
    store = MemoryStore(config=cfg)
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: ") as info:
        download(store, manifest, tmp_path / "out", workers=1, config=cfg)
    assert info.value.line == 3
    assert store.jobs() == []
    assert not (tmp_path / "out").exists()
