"""The PostgreSQL backend: many workers on many machines against one ledger.

``store`` holds :class:`PostgresStore`; ``schema`` the schema and its migrations;
``queries`` every SQL statement it runs; ``database`` the connection pool, the
transaction helper, the clock rule and the translation of driver errors.
"""

from __future__ import annotations
