"""A ledger's ``LISTEN``/``NOTIFY`` channel (one per schema) and what it carries."""

from __future__ import annotations

import hashlib

CHANNEL_PREFIX = "jobledger:"
DUE_NOW = "now"
DUE_LATER = "later"
DUE_NOW_MANY = "many"
"""A notification's payload is ``when:kind``: ``now`` when the job it announces is
eligible at commit, ``later`` when a waiter must read when it will be. A transaction that
makes more than one job of a kind eligible now sends ``many`` too: every idle worker for
the kind wakes, where ``now`` alone wakes the one whose turn it is
(:mod:`impl.postgres.pickup`)."""


def payload_after(announced: set[str], kind: str, *, later: bool) -> str | None:
    """The payload to send for one more job of ``kind`` in a transaction that has sent
    ``announced`` (None: nothing new to say); the caller adds it to ``announced``."""
    payload = f"{DUE_LATER if later else DUE_NOW}:{kind}"
    if payload not in announced:
        return payload
    if later:
        return None
    many = f"{DUE_NOW_MANY}:{kind}"
    return None if many in announced else many


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
