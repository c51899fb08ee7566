"""The engine core: an LLMEngine stepped in a loop, with add/abort commands applied between
steps, run on a thread of the server's process or in a process of its own.

    AsyncEngine (event loop)          core                       EngineLoop
    ------------------------          ----                       ----------
    send(("add", ...))      --------> ThreadCore: a list + lock  apply commands, engine.step(),
                                      ProcessCore: a pipe         report to the sink:
    EngineSink callbacks    <-------- (a reader thread)           added / stepped / failed

In its own process the engine has an interpreter and a GIL of its own: the model's Python
(scheduling, sampling, detokenizing, the glue between kernels) never waits for the event
loop's work (parsing requests, writing one SSE chunk per token and stream), and the other
way round. That is why `r1serve serve` uses ProcessCore; ThreadCore serves in-process use
and tests that reach into the engine.
"""
from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from r1serve.engine.llm_engine import LLMEngine
from r1serve.outputs import RequestOutput

log = logging.getLogger("r1serve.engine")

# next_commands(block) -> the commands that arrived (waiting for one if block), or None: stop
CommandSource = Callable[[bool], "list[tuple] | None"]


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's counters after its latest step (read by the server without locking)."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_kv_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0  # loop iterations (steps and command batches)


class EngineSink(Protocol):
    """Where a core reports; called off the event loop (the engine thread, or the thread
    reading the engine process's pipe)."""

    def added(self, request_id: str, error: BaseException | None, prompt_token_ids: list[int] | None) -> None: ...

    def stepped(self, outputs: list[RequestOutput], snapshot: EngineSnapshot) -> None: ...

    def failed(self, request_ids: list[str], message: str) -> None: ...

    def stopped(self, error: str | None) -> None: ...


class EngineLoop:
    """Steps an LLMEngine while it has work; applies the commands that arrived between steps."""

    def __init__(self, engine: LLMEngine, sink: EngineSink) -> None:
        self.engine = engine
        self.sink = sink
        self.num_steps = 0

    def run(self, next_commands: CommandSource) -> None:
        while (commands := next_commands(not self.engine.has_unfinished_requests())) is not None:
            for command in commands:
                self._apply(command)
            outputs = self._step() if self.engine.has_unfinished_requests() else []
            self.num_steps += 1
            self.sink.stepped(outputs, snapshot(self.engine, self.num_steps))

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort_request(command[1])
            return
        _, request_id, prompt, params = command
        ids: list[int] | None = None
        error: BaseException | None = None
        try:
            ids = self.engine.add_request(request_id, prompt, params)
        except Exception as exc:
            error = exc
        self.sink.added(request_id, error, ids)

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as exc:
            # The model step failed for the whole batch: fail the requests in it, keep serving.
            log.exception("engine step failed; failing the requests in it")
            self.sink.failed(self.engine.abort_all(), f"engine step failed: {exc}")
            return []


def snapshot(engine: LLMEngine, num_steps: int) -> EngineSnapshot:
    s = engine.stats()
    return EngineSnapshot(s["num_requests_running"], s["num_requests_waiting"], s["kv_cache_usage"],
                          s["num_kv_blocks"], s["num_free_blocks"], s["prefix_cache_queries"],
                          s["prefix_cache_hits"], num_steps)


# ---- on a thread ------------------------------------------------------------------------------


class ThreadCore:
    """The loop on a thread of this process; commands through a list guarded by a condition."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: list[tuple] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self, sink: EngineSink) -> None:
        loop = EngineLoop(self.engine, sink)

        def run() -> None:
            try:
                loop.run(self._next_commands)
                sink.stopped(None)
            except BaseException as exc:  # the loop itself broke: every waiting caller fails
                log.exception("engine thread stopped")
                sink.stopped(str(exc) or type(exc).__name__)

        self._thread = threading.Thread(target=run, name="r1serve-engine", daemon=True)
        self._thread.start()

    def send(self, command: tuple) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _next_commands(self, block: bool) -> list[tuple] | None:
        with self._wake:
            while block and not self._inbox and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return None
            inbox, self._inbox = self._inbox, []
            return inbox


# ---- in a process of its own ------------------------------------------------------------------


@dataclass(frozen=True)
class EngineInfo:
    """What the server needs to know of an engine loaded in another process."""

    max_model_len: int


class ProcessCore:
    """The loop in a child process (spawned: a fork of a process with torch's thread pools
    is unsafe). Commands go down a pipe from a writer thread, so a large prompt never blocks
    the event loop while the engine is mid-step; a reader thread turns the engine's messages
    into sink calls. The child exits when told to, or when the pipe closes (its parent died)."""

    def __init__(self, config, model_path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=run_engine_process, name="r1serve-engine", daemon=True,
                                 args=(config, model_path, child_conn, logging.getLogger().level))
        self._child_conn = child_conn
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()

    def load(self) -> EngineInfo:
        """Start the process and wait for its model to load (blocking: call it off the event loop)."""
        self._proc.start()
        self._child_conn.close()  # the child holds its end; EOF on ours now means it died
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited while loading (exit code {self._proc.exitcode})") from None
        if kind == "load_failed":
            self._proc.join(30)
            raise payload
        return payload

    def start(self, sink: EngineSink) -> None:
        threading.Thread(target=self._read, args=(sink,), name="r1serve-engine-reader", daemon=True).start()
        threading.Thread(target=self._write, name="r1serve-engine-writer", daemon=True).start()

    def send(self, command: tuple) -> None:
        self._outbox.put(command)

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def stop(self, timeout: float) -> None:
        self._outbox.put(("stop",))
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.warning("the engine process did not stop within %.0f s; killing it", timeout)
            self._proc.kill()  # it ignores SIGTERM (see run_engine_process)
            self._proc.join(5)
        self._outbox.put(None)  # ends the writer

    def _write(self) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                self._conn.send(command)
            except (OSError, ValueError):  # the process is gone; the reader reports it
                return

    def _read(self, sink: EngineSink) -> None:
        while True:
            try:
                kind, *payload = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                code = self._proc.exitcode
                sink.stopped(None if code == 0 else f"the engine process exited (exit code {code})")
                return
            getattr(sink, kind)(*payload)


def run_engine_process(config, model_path, conn, log_level: int) -> None:
    """The child process: load the model, then run the loop with the pipe as inbox and outbox."""
    # Ctrl-C reaches the whole process group, and service managers signal every process of
    # the service; the parent decides when the engine stops (after draining running
    # requests), so the child ignores both. It still ends if the parent dies: its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(config, model_path)
    except BaseException as exc:
        conn.send(("load_failed", _portable(exc)))
        return
    conn.send(("ready", EngineInfo(engine.max_model_len)))
    sink = _PipeSink(conn)

    def next_commands(block: bool) -> list[tuple] | None:
        commands = []
        try:
            if block or conn.poll():
                commands.append(conn.recv())
                while conn.poll():
                    commands.append(conn.recv())
        except EOFError:  # the parent is gone
            return None
        return None if any(c[0] == "stop" for c in commands) else commands

    try:
        EngineLoop(engine, sink).run(next_commands)
    except BaseException as exc:
        log.exception("engine loop stopped")
        sink.stopped(str(exc) or type(exc).__name__)
        raise SystemExit(1) from None
    sink.stopped(None)


class _PipeSink:
    def __init__(self, conn) -> None:
        self.conn = conn

    def added(self, request_id: str, error: BaseException | None, prompt_token_ids: list[int] | None) -> None:
        self.conn.send(("added", request_id, None if error is None else _portable(error), prompt_token_ids))

    def stepped(self, outputs: list[RequestOutput], snapshot: EngineSnapshot) -> None:
        # The prompt went over once (the add, and its ids with "added"); every delta carrying
        # it again would pickle 32 prompts per step. The AsyncEngine puts them back.
        for out in outputs:  # built for this step only: nobody else holds them
            out.prompt = out.prompt_token_ids = None
        self.conn.send(("stepped", outputs, snapshot))

    def failed(self, request_ids: list[str], message: str) -> None:
        self.conn.send(("failed", request_ids, message))

    def stopped(self, error: str | None) -> None:
        try:
            self.conn.send(("stopped", error))
        except OSError:
            pass


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
