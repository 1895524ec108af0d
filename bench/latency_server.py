"""A file server with a distant server's latency, in its own process, for the peer benchmark.

``python -m bench.latency_server --files N --size BYTES --latency SECONDS`` serves
``/f/0.bin`` ... ``/f/{N-1}.bin`` (pseudo-random bytes, the same for every run) on
127.0.0.1 and waits ``--latency`` seconds before every response, as one round trip to a
far-away host would. It speaks enough HTTP/1.1 for every client measured here: GET and
HEAD, keep-alive, ``Range: bytes=a-b`` and ``bytes=a-``, ``If-Range`` with the ETag.
``GET /_stats`` answers at once with the request counts as JSON, so a benchmark can check
that a rerun made no request. It prints ``port N`` on its first line and stops when its
standard input closes.

asyncio, not threads: the server must not be what limits 64 concurrent clients on two
cores, whichever client is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import zlib

from impl.download.testserver import generated_bytes

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class Files:
    """The served files and what was asked of them."""

    def __init__(self, count: int, size: int, latency: float) -> None:
        self.bodies = {f"/f/{i}.bin": generated_bytes(i, size) for i in range(count)}
        self.latency = latency
        self.counts = {"requests": 0, "GET": 0, "HEAD": 0}

    def etag(self, path: str) -> str:
        return f'"{zlib.crc32(path.encode()):08x}"'

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                keep = await self._answer(head.decode("latin-1"), writer)
                await writer.drain()
                if not keep:
                    return
        finally:
            writer.close()

    async def _answer(self, head: str, writer: asyncio.StreamWriter) -> bool:
        lines = head.split("\r\n")
        method, target, version = [*lines[0].split(" "), "", "", ""][:3]
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if target == "/_stats":
            self._send(writer, 200, json.dumps(self.counts).encode(), {}, method=method, keep=keep)
            return keep
        self.counts["requests"] += 1
        self.counts[method] = self.counts.get(method, 0) + 1
        await asyncio.sleep(self.latency)
        body = self.bodies.get(target)
        if body is None or method not in {"GET", "HEAD"}:
            self._send(writer, 404 if body is None else 405, b"", {}, method=method, keep=keep)
            return keep
        extra = {"ETag": self.etag(target), "Accept-Ranges": "bytes"}
        wanted = RANGE.match(headers.get("range", ""))
        if_range = headers.get("if-range")
        if wanted and (if_range is None or if_range == extra["ETag"]):
            start = int(wanted.group(1))
            end = int(wanted.group(2)) if wanted.group(2) else len(body) - 1
            if start >= len(body):
                extra["Content-Range"] = f"bytes */{len(body)}"
                self._send(writer, 416, b"", extra, method=method, keep=keep)
                return keep
            end = min(end, len(body) - 1)
            extra["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            self._send(writer, 206, body[start : end + 1], extra, method=method, keep=keep)
            return keep
        self._send(writer, 200, body, extra, method=method, keep=keep)
        return keep

    @staticmethod
    def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        headers: dict[str, str],
        *,
        method: str,
        keep: bool,
    ) -> None:
        reason = {200: "OK", 206: "Partial Content", 404: "Not Found", 405: "Not Allowed"}
        lines = [f"HTTP/1.1 {status} {reason.get(status, 'Range Not Satisfiable')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines += [
            f"Content-Length: {len(body)}",
            "Content-Type: application/octet-stream",
            f"Connection: {'keep-alive' if keep else 'close'}",
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(body)


async def main(count: int, size: int, latency: float) -> None:
    files = Files(count, size, latency)
    server = await asyncio.start_server(files.serve, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"port {port}", flush=True)
    loop = asyncio.get_running_loop()
    # The parent closes our standard input to stop us (or dies, which closes it too).
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.latency_server")
    parser.add_argument("--files", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    asyncio.run(main(args.files, args.size, args.latency))
