"""`r1serve serve` as a real process on a free port, for tests that talk HTTP to it."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, timeout: float = 240.0, db: str | None = None,
                 log_level: str = "warning") -> None:
        self.port = free_port()
        # Each server gets its own key/usage database unless told to share one.
        self.db = db or f"sqlite:///{log_path.parent / 'r1serve.db'}"
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "r1serve.cli", "serve", *args, "--port", str(self.port), "--log-level", log_level,
               "--db", self.db]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics, summed over the label sets that match `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        values = [s.value for family in text_string_to_metric_families(text) for s in family.samples
                  if s.name == name and labels.items() <= s.labels.items()]
        assert values, f"{name} {labels} not in /metrics"
        return sum(values)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no request runs or waits and no KV block is in use (aborts land a step later)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.metric("r1serve:num_requests_running") == 0 and self.metric("r1serve:num_requests_waiting") == 0
                    and self.metric("r1serve:kv_cache_usage_perc") == 0):
                return
            time.sleep(0.2)
        raise AssertionError("requests still running or KV blocks still in use")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
