"""URL canonicalisation: the documented rules, one case each."""

from __future__ import annotations

import pytest

from impl.download.url import canonical_url
from model.errors import InvalidInput


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTP://Example.COM/a", "http://example.com/a"),
        ("http://example.com:80/a", "http://example.com/a"),
        ("https://example.com:443/a", "https://example.com/a"),
        ("https://example.com:8443/a", "https://example.com:8443/a"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com/a#frag", "http://example.com/a"),
        ("http://example.com/%7euser/%2f", "http://example.com/~user/%2F"),
        ("http://example.com/?q=%aa&r=%41", "http://example.com/?q=%AA&r=A"),
        ("http://example.com/a b/ü", "http://example.com/a%20b/%C3%BC"),
        ("http://example.com./x?", "http://example.com/x"),
        ("http://bücher.example/", "http://xn--bcher-kva.example/"),
        ("  http://example.com/a  ", "http://example.com/a"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
        ("http://h/a/./b/../c", "http://h/a/c"),
        ("http://h/../../etc/passwd", "http://h/etc/passwd"),
        ("http://h/a/..", "http://h/"),
        ("http://h/a/b/.", "http://h/a/b/"),
    ],
)
def test_canonical_url_applies_the_documented_rule(raw: str, expected: str) -> None:
    assert canonical_url(raw) == expected


def test_canonical_url_is_idempotent() -> None:
    once = canonical_url("HTTPS://Ex.com:443/%7e/a%2f?b=%c3%bc#x")
    assert canonical_url(once) == once


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("ftp://example.com/x", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("example.com/x", "no scheme"),
        ("http:///x", "no host"),
        ("http://user:pw@example.com/", "user info"),
        ("http://example.com:99999/", "(?i)port"),
        ("http://example.com:0/", "port 0"),
        ("", "empty"),
    ],
)
def test_canonical_url_rejects_what_cannot_be_downloaded(raw: str, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        canonical_url(raw)
