"""The PostgreSQL backend: many workers on many machines against one ledger.

``store`` holds :class:`PostgresStore`; ``database`` the connection pool, the
transaction helper, the one clock rule and the translation of driver errors; ``schema``
the schema, its migrations and the state-machine trigger; ``queries`` every SQL
statement; ``registry``, ``plan``, ``effect`` and ``read`` the workflows, planning,
effects and read-only reports; ``rows`` turns rows into the model's records.
"""

from __future__ import annotations
