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

import aiohttp
import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpRunner:
    def __init__(self, args) -> None:
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "r1serve.cli"]
        if getattr(args, "cache_dir", None):
            cmd += ["--cache-dir", args.cache_dir]
        cmd += ["serve", args.model, "--served-model-name", "bench", "--dtype", args.dtype, "--port", str(port),
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
        return sum(t for t, _ in asyncio.run(self._all(ps, n)))

    def ttft(self, prompt: str) -> float:
        return asyncio.run(self._all([prompt], 1))[0][1]

    async def _all(self, ps: list[str], n: int) -> list[tuple[int, float]]:
        # aiohttp (C HTTP parser) rather than httpx: the client shares the 2 cores with the
        # server, and every chunk it parses is CPU the engine does not get.
        connector = aiohttp.TCPConnector(limit=len(ps) + 1)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(self.base, connector=connector, timeout=timeout) as session:
            return await asyncio.gather(*(self._one(session, p, n) for p in ps))

    async def _one(self, session: aiohttp.ClientSession, prompt: str, n: int) -> tuple[int, float]:
        """(output tokens from the server's usage, time to the first token)."""
        body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        t0, first, tokens = time.perf_counter(), None, 0
        async with session.post("/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                # Only the usage chunk is parsed as JSON: what is measured is the server.
                if first is None and line.startswith(b"data: {"):
                    first = time.perf_counter() - t0
                if line.startswith(b"data: {") and b'"usage": {' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        return tokens, first or 0.0

    def close(self) -> float:
        """Stop the server; returns its peak RSS in MiB."""
        self.proc.terminate()
        self.proc.wait(60)
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
