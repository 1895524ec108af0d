"""plan_many derives job keys from each identity's canonical text, encoded only once.

That shortcut must give exactly the contract's key, or a job planned by plan_many would
not be found by the same identity through job_key, another backend or another language.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.sqlite.plan import _identity_text, job_key_of
from impl.sqlite.store import SqliteStore
from model.key import Scalar, canon, check_scalars, job_key

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text()
)
identities = st.dictionaries(st.text(), scalars, max_size=5)
kinds = st.text(min_size=1)


@settings(deadline=None)
@given(kind=kinds, identity=identities)
def test_the_batch_key_is_the_contract_key(kind: str, identity: dict[str, Scalar]) -> None:
    text = canon(check_scalars(identity, what="identity")).decode("utf-8")
    assert job_key_of(canon(kind).decode("utf-8"), text) == job_key(kind, identity)


@settings(deadline=None)
@given(identity=identities)
def test_the_identity_text_is_its_canonical_encoding(identity: dict[str, Scalar]) -> None:
    expected = canon(check_scalars(identity, what="identity")).decode("utf-8")
    assert _identity_text(identity) == expected


@pytest.mark.parametrize(
    "identity",
    [{}, {"url": "https://é.example/ü"}, {"b": True, "a": 1, "n": None}, {"\u2028": "\x00"}],
)
def test_plan_many_ids_are_job_keys(tmp_path: Path, identity: dict[str, Scalar]) -> None:
    with SqliteStore(tmp_path / "db.sqlite") as store:
        assert store.plan_many("download", [identity]) == [job_key("download", identity)]
