"""A ledger's ``LISTEN``/``NOTIFY`` channel (one per schema) and what it carries."""

from __future__ import annotations

import hashlib

CHANNEL_PREFIX = "jobledger:"
DUE_NOW = "now"
DUE_LATER = "later"
"""A notification's payload is ``when:kind``: ``now`` when the job it announces is
eligible at commit, ``later`` when a waiter must read when it will be."""

_LONGEST = 63
"""PostgreSQL's longest identifier in bytes; a longer channel name is refused."""


def channel_of(schema: str) -> str:
    """The channel on which a ledger in ``schema`` announces new work.

    ``jobledger:<schema>`` when that fits in an identifier, else the prefix and a digest
    of the schema name (a collision would only wake another ledger's workers for nothing).
    """
    name = CHANNEL_PREFIX + schema
    if len(name.encode("utf-8")) <= _LONGEST:
        return name
    return CHANNEL_PREFIX + hashlib.sha256(schema.encode("utf-8")).hexdigest()[:40]
