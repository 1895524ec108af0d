"""The one typed configuration object and its defaults.

This module owns the values and their validation; reading them from YAML files and
``JOBLEDGER_*`` environment variables is I/O and lives in ``impl.config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs
from attrs import field, frozen

from model.errors import ConfigError, InvalidInput
from model.retention import parse_age

LEASE_TTL_DEFAULT = 30.0
MAX_ATTEMPTS_DEFAULT = 5
BACKOFF_BASE_DEFAULT = 1.0
BACKOFF_CAP_DEFAULT = 300.0
RESULT_LIMIT_DEFAULT = 1024 * 1024
# How deeply payloads and effect results may nest containers. Python's json encodes and
# decodes nesting by recursion, so without a limit of its own the deepest value that
# works depends on how deep the caller's stack is: a value stored from a shallow stack
# could fail to decode on a deeper one. 128 leaves a wide margin under Python's default
# recursion limit of 1000 (serde_json's default is the same).
JSON_DEPTH_LIMIT_DEFAULT = 128
BUSY_TIMEOUT_DEFAULT = 5.0
PER_HOST_DEFAULT = 4
"""Requests in flight per host when neither ``download_per_host`` nor a worker count says."""
RETENTION_INTERVAL_DEFAULT = 3600.0
SQLITE_GROUP_WINDOW_DEFAULT = 0.0
"""Seconds a SQLite group transaction may gather other threads' writes (0: no grouping)."""

SQLITE_WRITERS_QUEUE_DEFAULT = "mutex"
"""How the processes writing one SQLite file queue for its write lock: ``mutex`` (a robust
process-shared mutex in ``<ledger>-writers``, where the platform has one) or ``none``."""

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{attribute.name} must be a number > 0, got {value!r}")


def _non_negative(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"{attribute.name} must be a number >= 0, got {value!r}")


def _positive_int(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _fraction(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{attribute.name} must be a number from 0 to 1, got {value!r}")


def _synchronous(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigError(
            f"{attribute.name} must be one of OFF, NORMAL, FULL, EXTRA, got {value!r}"
        )


def _writers_queue(_inst: object, attribute: attrs.Attribute[str], value: object) -> None:
    if value not in ("mutex", "none"):
        raise ConfigError(f"{attribute.name} must be 'mutex' or 'none', got {value!r}")


def _age(_inst: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{attribute.name} must be an age like 30d, 12h or 0s, got {value!r}")
    try:
        parse_age(value)
    except InvalidInput:
        raise ConfigError(
            f"{attribute.name} must be an age like 30d, 12h, 15m, 90s, 2w or 0s, got "
            f"{value!r}; leave it unset to keep finished jobs for ever"
        ) from None


def _retention_failed(_inst: object, attribute: attrs.Attribute[str], value: object) -> None:
    if value not in ("prune", "keep"):
        raise ConfigError(f"{attribute.name} must be 'prune' or 'keep', got {value!r}")


def _optional_str(_inst: object, attribute: attrs.Attribute[str], value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{attribute.name} must be a string, got {value!r}")


@frozen(kw_only=True)
class Config:
    """Every tunable of jobledger, with the contract's defaults.

    Durations are seconds. ``renew_every`` of None means a third of the lease TTL.
    ``download_per_host`` of None means as many as the download's ``--workers``.
    ``download_rate_per_host`` is requests per second per host (0: no limit).
    ``download_breaker_failures`` connection failures or 5xx in a row open a host's
    circuit breaker for ``download_breaker_cooldown`` seconds; a download run with only
    such a host's jobs left ends (leaving them pending) once the host has been down for
    ``download_host_patience`` seconds and a probe failed.
    ``sqlite_group_window`` > 0 makes the write transactions of one process's threads on
    one SQLite file share commits (see ``impl.sqlite.group``): a group stays open at most
    that many seconds while other threads queue to join it; 0 commits each on its own.
    ``sqlite_writers_queue`` ``mutex`` makes the ungrouped write transactions of every
    process on one SQLite file queue on one robust mutex before they take SQLite's lock
    (see ``impl.sqlite.writers``; where it cannot be had they poll, as with ``none``).
    """

    db: str | None = field(default=None, validator=_optional_str)
    lease_ttl: float = field(default=LEASE_TTL_DEFAULT, validator=_positive)
    renew_every: float | None = field(default=None)
    max_attempts: int = field(default=MAX_ATTEMPTS_DEFAULT, validator=_positive_int)
    backoff_base: float = field(default=BACKOFF_BASE_DEFAULT, validator=_non_negative)
    backoff_cap: float = field(default=BACKOFF_CAP_DEFAULT, validator=_non_negative)
    backoff_jitter: float = field(default=0.0, validator=_fraction)
    result_limit: int = field(default=RESULT_LIMIT_DEFAULT, validator=_positive_int)
    json_depth_limit: int = field(default=JSON_DEPTH_LIMIT_DEFAULT, validator=_positive_int)
    sqlite_synchronous: str = field(default="NORMAL", validator=_synchronous)
    busy_timeout: float = field(default=BUSY_TIMEOUT_DEFAULT, validator=_non_negative)
    sqlite_group_window: float = field(default=SQLITE_GROUP_WINDOW_DEFAULT, validator=_non_negative)
    sqlite_writers_queue: str = field(
        default=SQLITE_WRITERS_QUEUE_DEFAULT, validator=_writers_queue
    )
    postgres_schema: str = field(default="jobledger", validator=_optional_str)
    log_format: str = field(default="text")
    download_connect_timeout: float = field(default=10.0, validator=_positive)
    download_read_timeout: float = field(default=30.0, validator=_positive)
    download_max_redirects: int = field(default=10, validator=_positive_int)
    download_max_retries: int = field(default=3, validator=_positive_int)
    download_max_bytes: int = field(default=10 * 1024**3, validator=_positive_int)
    download_per_host: int | None = field(default=None)
    download_user_agent: str = field(default="jobledger/0.1 (+https://pypi.org/project/jobledger)")
    download_lease_ttl: float = field(default=10.0, validator=_positive)
    download_world_delay: float = field(default=60.0, validator=_non_negative)
    download_rate_per_host: float = field(default=0.0, validator=_non_negative)
    download_breaker_failures: int = field(default=3, validator=_positive_int)
    download_breaker_cooldown: float = field(default=30.0, validator=_positive)
    download_host_patience: float = field(default=60.0, validator=_non_negative)
    retention: str | None = field(default=None, validator=_age)
    retention_interval: float = field(default=RETENTION_INTERVAL_DEFAULT, validator=_positive)
    retention_failed: str = field(default="prune", validator=_retention_failed)

    def __attrs_post_init__(self) -> None:
        if self.renew_every is not None:
            if (
                isinstance(self.renew_every, bool)
                or not isinstance(self.renew_every, int | float)
                or not self.renew_every > 0
            ):
                raise ConfigError(f"renew_every must be a number > 0, got {self.renew_every!r}")
            if self.renew_every >= self.lease_ttl:
                raise ConfigError(
                    f"renew_every ({self.renew_every}) must be shorter than lease_ttl "
                    f"({self.lease_ttl}), or a lease expires before it is renewed"
                )
        per_host = self.download_per_host
        if per_host is not None and (
            isinstance(per_host, bool) or not isinstance(per_host, int) or per_host < 1
        ):
            raise ConfigError(
                f"download_per_host must be an integer >= 1 or empty (as many as --workers), "
                f"got {per_host!r}"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")

    def per_host_limit(self, workers: int | None = None) -> int:
        """Requests in flight per host: ``download_per_host`` when set, else ``workers``
        (a user who asks for 64 downloads at once gets them), else
        :data:`PER_HOST_DEFAULT`."""
        if self.download_per_host is not None:
            return self.download_per_host
        return workers if workers is not None else PER_HOST_DEFAULT

    @property
    def retention_age(self) -> float | None:
        """Seconds after which a finished job is pruned automatically (None: never).

        ``retention`` is an age like ``30d``; a long-running ``jobledger worker`` (and a
        :class:`impl.Reconciler` given a retention) prunes every ``retention_interval``
        seconds, keeping failed jobs when ``retention_failed`` is ``keep``.
        """
        return None if self.retention is None else parse_age(self.retention)

    @property
    def renew_interval(self) -> float:
        """Seconds between background renewals of a lease with the default TTL."""
        return self.renew_every if self.renew_every is not None else self.lease_ttl / 3

    def backoff(self, attempt: int) -> float:
        """Return the retry delay after failed attempt number ``attempt`` (1-based).

        ``backoff_base * 2**(attempt-1)``, capped at ``backoff_cap``. Jitter, when
        configured, is applied by the caller that owns a random source.
        """
        exponent = max(attempt - 1, 0)
        # Cap the exponent before raising 2 to it: attempts are user-configurable and
        # 2**10000 would be a float overflow.
        return float(min(self.backoff_cap, self.backoff_base * 2.0 ** min(exponent, 64)))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Return every configuration key's name."""
        return tuple(a.name for a in attrs.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], *, source: str) -> Config:
        """Build a config from ``values``, naming ``source`` in any error.

        Raises:
            ConfigError: for an unknown key (listing the known ones) or a bad value.
        """
        known = cls.keys()
        for key in values:
            if key not in known:
                raise ConfigError(
                    f"unknown configuration key {key!r} in {source}; known keys: {', '.join(known)}"
                )
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
