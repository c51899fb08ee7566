"""The offline benchmark's "http" system: the same prompts sent to a real `r1serve serve`
process as concurrent streaming completions, to measure what the HTTP layer costs; and its
"llama-server" system: the same requests to any OpenAI-compatible endpoint already
running (llama.cpp's `llama-server` on the same GGUF file, say)."""
from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

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
                "--log-level", "warning", "--cpu-isa", getattr(args, "cpu_isa", "auto")]
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
        return sum(r.usage()["completion_tokens"] for r in self._stream(ps, n, READ_EVERY_S))

    def ttft(self, prompt: str) -> float:
        return self._stream([prompt], 1, None)[0].first_token_s or 0.0

    def _stream(self, ps: list[str], n: int, read_every_s: float | None) -> list[StreamedResponse]:
        bodies = [{"model": "bench", "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}} for p in ps]
        responses = stream_all(self.host, self.port, "/v1/completions", bodies, read_every_s)
        for r in responses:
            if r.status != 200:
                raise RuntimeError(f"the server answered {r.status}: {r.tail[-500:]!r}")
        return responses

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the API server process (its engine child not included) and of
        this process, the load generator; {} where /proc is not there to read."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return {}
        me = resource.getrusage(resource.RUSAGE_SELF)
        return {"server": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"),
                "client": me.ru_utime + me.ru_stime}

    def close(self) -> float:
        """Stop the server; returns its peak RSS in MiB: the API process and its engine
        process together (each one's high-water mark) where /proc can be read."""
        peak = sum(_peak_rss_kib(pid) for pid in _process_tree(self.proc.pid))
        self.proc.terminate()
        self.proc.wait(60)
        # ru_maxrss of children is one process's peak, and a fork of this process counts its
        # size at the fork: only the fallback.
        return peak / 1024 if peak else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


class EndpointRunner:
    """Streaming completions against a running OpenAI-compatible server given by URL. Its
    peak memory is read from /proc when its pid is given (the server must run on this
    machine for that), else reported as 0."""

    def __init__(self, base_url: str, pid: int | None, model: str = "bench") -> None:
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"--llama-server-url {base_url!r} must be an http:// URL of the API root, e.g. "
                             "http://127.0.0.1:8080/v1")
        self.host, self.port, self.path = url.hostname, url.port or 80, url.path + "/completions"
        self.pid, self.model = pid, model
        self.dtype = "gguf"  # the server's own choice; llama.cpp computes with the file's quantized weights

    def generate(self, ps: list[str], n: int) -> int:
        return sum(r.usage()["completion_tokens"] for r in self._stream(ps, n, READ_EVERY_S))

    def ttft(self, prompt: str) -> float:
        return self._stream([prompt], 1, None)[0].first_token_s or 0.0

    def _stream(self, ps: list[str], n: int, read_every_s: float | None) -> list[StreamedResponse]:
        # ignore_eos is llama.cpp's (and vLLM's, and r1serve's) extension: every run the same length
        bodies = [{"model": self.model, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}} for p in ps]
        responses = stream_all(self.host, self.port, self.path, bodies, read_every_s)
        for r in responses:
            if r.status != 200:
                raise RuntimeError(f"{self.host}:{self.port} answered {r.status}: {r.tail[-500:]!r}")
        return responses

    def close(self) -> float:
        return _peak_rss_kib(self.pid) / 1024 if self.pid else 0.0


def _process_tree(pid: int) -> list[int]:
    # A child is listed under the thread that started it (the engine: a loader thread).
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += (task / "children").read_text().split()
        except OSError:
            pass
    return [pid] + [p for child in children for p in _process_tree(int(child))]


def _peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# The load generator shares the machine's cores with the server it measures. Woken per
# chunk, it would preempt one of the engine's threads 32 times a step (a cost no remote
# client puts on a server); reading its sockets every few ms wakes it ~10 times a step.
READ_EVERY_S = 0.005


def stream_all(host: str, port: int, path: str, bodies: list[dict], read_every_s: float | None,
               timeout_s: float = 600) -> list[StreamedResponse]:
    """POST each body on a connection of its own and read every streamed response to its end,
    on this thread: one selector, and (with read_every_s) a sleep between passes instead of a
    wake-up per chunk."""
    responses = [StreamedResponse(post_request(host, path, body)) for body in bodies]
    selector = selectors.DefaultSelector()
    for r in responses:
        sock = socket.create_connection((host, port))
        r.t0 = time.perf_counter()
        sock.sendall(r.request)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, r)
    deadline = time.monotonic() + timeout_s
    try:
        while selector.get_map():
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamed responses not finished after {timeout_s} s")
            if read_every_s:
                time.sleep(read_every_s)
            for key, _ in selector.select(timeout=0 if read_every_s else 1.0):
                r = key.data
                data = key.fileobj.recv(1 << 16)
                if data:
                    r.feed(data)
                if not data or r.complete:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    if not r.complete:
                        raise ConnectionError(f"the server closed a connection mid-response: {r.tail[-300:]!r}")
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    return responses


def post_request(host: str, path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + data


class StreamedResponse:
    """One streamed HTTP response, parsed by httptools (C) as its bytes arrive.

    The load generator shares the machine with the server it measures, so it keeps no more
    than the measurement needs: the time of the first body bytes, and the last few KiB,
    where the usage chunk is."""

    TAIL_BYTES = 8192

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.t0 = time.perf_counter()  # reset when the request is sent
        self.first_body_s: float | None = None
        # The first event carrying generated text: a server may send others before it (llama-server
        # reports the progress of a long prompt), which are not a first token.
        self.first_token_s: float | None = None
        self.last_body_s: float | None = None
        self.status: int | None = None
        self.tail = b""
        self.complete = False

    def feed(self, data: bytes) -> None:
        self.parser.feed_data(data)  # raises httptools.HttpParserError on a malformed response

    # httptools callbacks

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.last_body_s = time.perf_counter() - self.t0
        if self.first_body_s is None:
            self.first_body_s = self.last_body_s
        if self.first_token_s is None and (b'"text"' in body or b'"content"' in body):
            self.first_token_s = self.last_body_s
        self.tail = (self.tail + body)[-self.TAIL_BYTES:]

    def on_message_complete(self) -> None:
        self.complete = True

    def usage(self) -> dict:
        """The usage of the stream's last JSON event (stream_options.include_usage)."""
        for event in reversed(self.tail.split(b"\n\n")):
            if event.startswith(b"data: {"):
                usage = json.loads(event[6:]).get("usage")
                if usage:
                    return usage
        raise RuntimeError(f"no usage chunk at the end of the stream: {self.tail[-500:]!r}")
