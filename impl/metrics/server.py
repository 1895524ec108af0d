"""The ``/metrics`` endpoint: prometheus_client's HTTP server, with jobledger's errors.

It binds :data:`impl.metrics.DEFAULT_HOST` (127.0.0.1) unless told otherwise.
"""

from __future__ import annotations

import errno
import threading

from attrs import frozen
from prometheus_client import CollectorRegistry, start_http_server

from impl.metrics import DEFAULT_HOST
from model.errors import InvalidInput


@frozen
class MetricsServer:
    """A running endpoint: where it listens, and how to stop it."""

    host: str
    port: int
    _httpd: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """The endpoint's URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port."""
        self._httpd.shutdown()  # type: ignore[attr-defined]
        self._httpd.server_close()  # type: ignore[attr-defined]
        self._thread.join(5.0)


def serve(registry: CollectorRegistry, *, port: int, host: str = DEFAULT_HOST) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    ``port`` 0 picks a free port (see :attr:`MetricsServer.port`).

    Raises:
        InvalidInput: the port is taken or out of range, or the host is not an address
            of this machine.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidInput(f"metrics port must be an int from 0 to 65535, got {port!r}")
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InvalidInput(
                f"cannot serve metrics on {host}:{port}: the port is already in use; "
                "stop what listens there or choose another --port (0 picks a free one)"
            ) from exc
        raise InvalidInput(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; pass an "
            "address of this machine as --host (default 127.0.0.1)"
        ) from exc
    return MetricsServer(host, int(httpd.server_port), httpd, thread)
