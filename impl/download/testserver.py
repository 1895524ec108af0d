"""A local HTTP file server with Range support and scripted misbehaviour, for tests and
the demo.

It listens on 127.0.0.1 on a free port, serves byte strings registered with
:meth:`FileServer.add`, and honours ``Range: bytes=a-b`` / ``bytes=a-``, ``If-Range``
(ETag or Last-Modified), ``HEAD`` and ``Accept-Ranges``. Each resource can misbehave on
purpose: fail with a status, fail the first N requests (``500`` then success, ``429`` with
``Retry-After``), cut the body short, send a wrong ``Content-Range``, ignore ``Range``,
redirect (to itself for a loop), hide its length, or trickle bytes slowly. The whole
server can answer 503 (or 429) for a while (:meth:`FileServer.outage`), or go down and
come back on the same port (:meth:`FileServer.close`, :meth:`FileServer.restart`). Every
request is logged so a test can assert "no GET was made" or "a ranged request was made".
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import random
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from attrs import define, field, frozen

CHUNK = 16 * 1024
LAST_MODIFIED = email.utils.formatdate(1_700_000_000, usegmt=True)


def generated_bytes(seed: int, size: int) -> bytes:
    """Return ``size`` pseudo-random bytes determined by ``seed`` (test and demo content)."""
    return random.Random(seed).randbytes(size)


@define
class Resource:
    """One path served by :class:`FileServer` and how it (mis)behaves."""

    body: bytes
    etag: str | None = None
    last_modified: str | None = LAST_MODIFIED
    accept_ranges: bool = True
    content_type: str = "application/octet-stream"
    status: int | None = None
    fail_first: list[int] = field(factory=list)
    retry_after: str | None = None
    truncate_at: int | None = None
    truncate_times: int = 1
    wrong_content_range: bool = False
    ignore_range: bool = False
    redirect_to: str | None = None
    hide_length: bool = False
    rate: float | None = None
    head_status: int | None = None
    # Seconds between logging a request and answering it: one slow round trip.
    delay: float = 0.0


@frozen
class Request:
    """One logged request."""

    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int
    user_agent: str | None
    at: float


class _QuietServer(ThreadingHTTPServer):
    """A threaded server that knows its open connections (so that stopping it drops them
    like a machine going down) and prints no traceback when a client goes away."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._conn_lock:
            live = list(self.connections)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | OSError):
            return
        super().handle_error(request, client_address)


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving :class:`Resource` objects.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, *, port: int = 0) -> None:
        self.resources: dict[str, Resource] = {}
        self.log: list[Request] = []
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._outage: tuple[int, int, str | None] | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Without TCP_NODELAY each response on a kept-alive connection waits ~40 ms
            # for the client's delayed ACK.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                """Keep test output clean: the request log is the record."""

            def do_HEAD(self) -> None:
                server._serve(self, head=True)

            def do_GET(self) -> None:
                server._serve(self, head=False)

        self._handler = Handler
        self._httpd = _QuietServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, close the socket and drop every open connection (as a machine
        that goes down would: a client reading a body sees it break off)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.drop_connections()
        self._thread.join(timeout=5)

    def restart(self) -> None:
        """Serve again on the same port, with the same resources and log, after
        :meth:`close` (a host that comes back)."""
        self._httpd = _QuietServer(("127.0.0.1", self.port), self._handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def outage(self, requests: int, *, status: int = 503, retry_after: str | None = None) -> None:
        """Answer the next ``requests`` requests (any path) with ``status`` (and
        ``Retry-After``), as a host that is overloaded or in maintenance for a while."""
        with self._lock:
            self._outage = (requests, status, retry_after)

    def url(self, path: str) -> str:
        """Return the full URL of ``path`` on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, body: bytes, **behaviour: object) -> str:
        """Serve ``body`` at ``path`` (with :class:`Resource` options); return its URL.

        The ETag defaults to a strong tag derived from the body's hash.
        """
        resource = Resource(body, **behaviour)  # type: ignore[arg-type]
        if resource.etag is None and "etag" not in behaviour:
            resource.etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        with self._lock:
            self.resources[path] = resource
        return self.url(path)

    def requests(self, path: str | None = None, method: str | None = None) -> list[Request]:
        """Return the logged requests, optionally only for ``path`` and ``method``."""
        with self._lock:
            return [
                r
                for r in self.log
                if (path is None or r.path.partition("?")[0] == path)
                and (method is None or r.method == method)
            ]

    def _record(self, req: BaseHTTPRequestHandler, status: int) -> None:
        with self._lock:
            self.log.append(
                Request(
                    method=req.command,
                    path=req.path,
                    range=req.headers.get("Range"),
                    if_range=req.headers.get("If-Range"),
                    status=status,
                    user_agent=req.headers.get("User-Agent"),
                    at=time.monotonic(),
                )
            )

    def _empty(self, req: BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
        self._record(req, status)
        req.send_response(status)
        for name, value in headers.items():
            req.send_header(name, value)
        req.send_header("Content-Length", "0")
        req.end_headers()

    def _serve(self, req: BaseHTTPRequestHandler, *, head: bool) -> None:
        with self._lock:
            outage = self._outage
            if outage is not None:
                left, code, after = outage
                self._outage = (left - 1, code, after) if left > 1 else None
        if outage is not None:
            self._empty(req, code, {"Retry-After": after} if after else {})
            return
        with self._lock:
            res = self.resources.get(req.path.partition("?")[0])
            scripted = res.fail_first.pop(0) if res is not None and res.fail_first else None
        if res is None:
            self._empty(req, 404, {})
            return
        if scripted is not None:
            extra = {"Retry-After": res.retry_after} if res.retry_after else {}
            self._empty(req, scripted, extra)
            return
        if res.status is not None:
            self._empty(req, res.status, {})
            return
        if res.redirect_to is not None:
            self._empty(req, 302, {"Location": self.url(res.redirect_to)})
            return
        if head and res.head_status is not None:
            self._empty(req, res.head_status, {})
            return
        body = res.body
        total = len(body)
        start, end = 0, total - 1
        status = 200
        wanted = req.headers.get("Range")
        if_range = req.headers.get("If-Range")
        if wanted and res.accept_ranges and not res.ignore_range and not head:
            fresh = if_range is None or if_range in (res.etag, res.last_modified)
            parsed = _parse_range(wanted, total)
            if parsed is None and fresh:
                self._empty(req, 416, {"Content-Range": f"bytes */{total}"})
                return
            if parsed is not None and fresh:
                start, end = parsed
                status = 206
        self._record(req, status)
        if res.delay:
            time.sleep(res.delay)
        req.send_response(status)
        req.send_header("Content-Type", res.content_type)
        if res.etag:
            req.send_header("ETag", res.etag)
        if res.last_modified:
            req.send_header("Last-Modified", res.last_modified)
        if res.accept_ranges:
            req.send_header("Accept-Ranges", "bytes")
        if status == 206:
            shown = start + 1 if res.wrong_content_range else start
            req.send_header("Content-Range", f"bytes {shown}-{end}/{total}")
        if res.hide_length:
            req.send_header("Connection", "close")
            req.close_connection = True
        else:
            req.send_header("Content-Length", str(end - start + 1))
        req.end_headers()
        if head:
            return
        stop = end + 1
        with self._lock:
            if res.truncate_at is not None and res.truncate_times > 0 and stop > res.truncate_at:
                res.truncate_times -= 1
                stop = max(res.truncate_at, start)
                req.close_connection = True
        self._send(req, body[start:stop], res.rate)

    def _send(self, req: BaseHTTPRequestHandler, data: bytes, rate: float | None) -> None:
        began = time.monotonic()
        sent = 0
        try:
            for offset in range(0, len(data), CHUNK):
                piece = data[offset : offset + CHUNK]
                req.wfile.write(piece)
                sent += len(piece)
                with self._lock:
                    self.bytes_sent += len(piece)
                if rate:
                    req.wfile.flush()
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
            req.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client went away (a killed worker): nothing to clean up.
            req.close_connection = True


def _parse_range(value: str, total: int) -> tuple[int, int] | None:
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if not first.isdigit():
        return None
    start = int(first)
    end = int(last) if last.isdigit() else total - 1
    if start >= total or end < start:
        return None
    return start, min(end, total - 1)
