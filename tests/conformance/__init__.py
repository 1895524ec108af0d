"""The cross-backend conformance suite: one contract, checked on every store.

Every test here takes the ``store`` (or ``store_factory`` and ``clock``) fixture of
``tests/conftest.py``, so it runs on the reference model, SQLite and PostgreSQL alike.
"""
