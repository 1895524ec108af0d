"""Scraping a real /metrics endpoint over HTTP and reading it with prometheus_client's
own parser, as Prometheus would."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> list[Sample]:
    """GET ``url`` and return every sample of every family."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def by_key(samples: list[Sample]) -> Samples:
    """Samples keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}


def names(samples: list[Sample]) -> set[str]:
    """Every sample name (``_total``, ``_bucket``, ``_count``, ``_sum`` included)."""
    return {s.name for s in samples}
