"""The offline benchmark's "http" system: the same prompts sent to a real `r1serve serve`
process as concurrent streaming completions, to measure what the HTTP layer costs."""
from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
import time

import httptools
import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpRunner:
    def __init__(self, args) -> None:
        self.host, self.port = "127.0.0.1", _free_port()
        self.base = f"http://{self.host}:{self.port}"
        cmd = [sys.executable, "-m", "r1serve.cli"]
        if getattr(args, "cache_dir", None):
            cmd += ["--cache-dir", args.cache_dir]
        cmd += ["serve", args.model, "--served-model-name", "bench", "--dtype", args.dtype, "--port", str(self.port),
                "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._wait_ready()
        self.dtype = args.dtype

    def _wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"r1serve serve exited: {self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("r1serve serve did not become ready")

    def generate(self, ps: list[str], n: int) -> int:
        return sum(t for t, _ in _run(self._all(ps, n)))

    def ttft(self, prompt: str) -> float:
        return _run(self._all([prompt], 1))[0][1]

    async def _all(self, ps: list[str], n: int) -> list[tuple[int, float]]:
        return await asyncio.gather(*(self._one(p, n) for p in ps))

    async def _one(self, prompt: str, n: int) -> tuple[int, float]:
        """(output tokens from the server's usage, time to the first token)."""
        body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        loop = asyncio.get_running_loop()
        stream = StreamedResponse(post_request(self.host, "/v1/completions", body))
        await loop.create_connection(lambda: stream, self.host, self.port)
        await asyncio.wait_for(stream.done, 600)
        if stream.status != 200:
            raise RuntimeError(f"the server answered {stream.status}: {stream.tail[-500:]!r}")
        return stream.usage()["completion_tokens"], stream.first_body_s or 0.0

    def close(self) -> float:
        """Stop the server; returns its peak RSS in MiB."""
        self.proc.terminate()
        self.proc.wait(60)
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _run(coro):
    # uvloop when present (a dependency except on Windows): a third of the client's CPU per chunk.
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def post_request(host: str, path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + data


class StreamedResponse(asyncio.Protocol):
    """One request on its own connection, its streamed response parsed by httptools (C).

    The load generator shares the machine with the server it measures, so it does no more
    per chunk than the measurement needs: the time of the first body bytes, and the last
    few KiB, where the usage chunk is."""

    TAIL_BYTES = 8192

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        self.first_body_s: float | None = None
        self.status: int | None = None
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(ConnectionError(f"the server closed the connection mid-response ({exc})"))

    # httptools callbacks

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.first_body_s is None:
            self.first_body_s = time.perf_counter() - self.t0
        self.tail = (self.tail + body)[-self.TAIL_BYTES:]

    def on_message_complete(self) -> None:
        self._end(None)
        self.transport.close()

    def _end(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)

    def usage(self) -> dict:
        """The usage of the stream's last JSON event (stream_options.include_usage)."""
        for event in reversed(self.tail.split(b"\n\n")):
            if event.startswith(b"data: {"):
                usage = json.loads(event[6:]).get("usage")
                if usage:
                    return usage
        raise RuntimeError(f"no usage chunk at the end of the stream: {self.tail[-500:]!r}")
