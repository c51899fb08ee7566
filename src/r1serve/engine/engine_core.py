"""The engine core: an LLMEngine stepped in a loop, with add/abort commands applied between
steps, run on a thread of the server's process or in a process of its own.

    AsyncEngine (event loop)          core                       EngineLoop
    ------------------------          ----                       ----------
    send(AddRequest(...))   --------> ThreadCore: a list + lock  apply commands, engine.step(),
                                      ProcessCore: a pipe         report to the sink:
    EngineSink.report(...)  <-------- (a reader thread)           Added / Stepped / Failed

The messages are the frozen classes of core_messages.py; each side dispatches on the class.

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
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Protocol

from r1serve.engine.core_messages import (AbortRequest, Added, AddRequest, Command, EngineInfo, Failed, LoadFailed,
                                          Reply, Shutdown, Stepped, Stopped, check_command, unknown_message)
from r1serve.engine.engine_stats import EngineStats
from r1serve.errors import RankFailedError
from r1serve.outputs import RequestOutput

if TYPE_CHECKING:  # the engine (torch) is imported where it runs, not where a process is started
    from r1serve.executor.replica_group import ReplicaSpec
    from r1serve.engine.llm_engine import LLMEngine

log = logging.getLogger("r1serve.engine")

# next_commands(block) -> the commands that arrived, waiting for one if block
CommandSource = Callable[[bool], list[Command]]


class EngineSink(Protocol):
    """Where a core reports; called off the event loop (the engine thread, or the thread
    reading the engine process's pipe)."""

    def report(self, reply: Reply) -> None: ...


class EngineCore(Protocol):
    """What runs an engine's loop for an AsyncEngine, wherever it runs: ThreadCore (a thread of
    this process), ProcessCore (a process of its own), data_parallel.DataParallelCore (N
    processes behind one). A loaded core is started once, takes commands, and reports to its
    sink until stopped."""

    def start(self, sink: EngineSink) -> None: ...

    def send(self, command: Command) -> None: ...

    def is_alive(self) -> bool: ...

    def stop(self, timeout: float) -> None: ...


class EngineLoop:
    """Steps an LLMEngine while it has work; applies the commands that arrived between steps."""

    def __init__(self, engine: LLMEngine, sink: EngineSink) -> None:
        self.engine = engine
        self.sink = sink
        self.num_steps = 0

    def run(self, next_commands: CommandSource) -> None:
        """Returns when a Shutdown arrives (the commands that came with it are not applied)."""
        while True:
            commands = next_commands(not self.engine.has_unfinished_requests())
            if any(isinstance(c, Shutdown) for c in commands):
                return
            for command in commands:
                self._apply(command)
            outputs = self._step() if self.engine.has_unfinished_requests() else []
            self.num_steps += 1
            self.sink.report(Stepped(outputs, stats_after(self.engine, self.num_steps)))

    def _apply(self, command: Command) -> None:
        match command:
            case AddRequest():
                self._add(command)
            case AbortRequest(request_id=request_id):
                self.engine.abort_request(request_id)
            case _:  # send() refuses these; one here came round it, from a CommandSource of its own
                raise TypeError(f"not an engine core command: {unknown_message(command, Command)}")

    def _add(self, command: AddRequest) -> None:
        try:
            ids = self.engine.add_request(command.request_id, command.prompt, command.params)
        except Exception as exc:
            self.sink.report(Added(command.request_id, exc, None))
            return
        self.sink.report(Added(command.request_id, None, ids))

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except RankFailedError as exc:
            # A rank of the group is gone: fail what was running, then end the loop (Stopped
            # with the error), so the server reports itself unhealthy instead of serving on.
            self.sink.report(Failed(self.engine.abort_all(), str(exc)))
            raise
        except Exception as exc:
            # The model step failed for the whole batch: fail the requests in it, keep serving.
            log.exception("engine step failed; failing the requests in it")
            self.sink.report(Failed(self.engine.abort_all(), f"engine step failed: {exc}"))
            return []


class LockstepLoop(EngineLoop):
    """The loop of one replica under DP attention: every replica runs every step (its MoE
    layers are one group with the others'), so before each the replicas agree whether any
    has work or was told to stop; none blocks on its own commands while another steps."""

    # All idle: how long to wait before asking again, doubling while it lasts (a request
    # then waits at most IDLE_POLL_MAX_S to start; an idle server costs a few polls a second).
    IDLE_POLL_S, IDLE_POLL_MAX_S = 0.002, 0.05

    def run(self, next_commands: CommandSource) -> None:
        idle_s = self.IDLE_POLL_S
        while True:
            commands = next_commands(False)
            stop = any(isinstance(c, Shutdown) for c in commands)
            if not stop:
                for command in commands:
                    self._apply(command)
            any_work, any_stop = self.engine.replicas.agree(self.engine.has_unfinished_requests(), stop)
            if any_stop:
                return
            if not any_work:
                if commands:  # the adds' and aborts' counters
                    self.sink.report(Stepped([], stats_after(self.engine, self.num_steps)))
                time.sleep(idle_s)
                idle_s = min(2 * idle_s, self.IDLE_POLL_MAX_S)
                continue
            idle_s = self.IDLE_POLL_S
            # A failed step cannot be survived here: the other replicas are in its collectives.
            outputs = self.engine.step()
            self.num_steps += 1
            self.sink.report(Stepped(outputs, stats_after(self.engine, self.num_steps)))


def stats_after(engine: LLMEngine, num_steps: int) -> EngineStats:
    return replace(engine.stats(), num_steps=num_steps)


# ---- on a thread ------------------------------------------------------------------------------


class ThreadCore:
    """The loop on a thread of this process; commands through a list guarded by a condition."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: list[Command] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self, sink: EngineSink) -> None:
        loop = EngineLoop(self.engine, sink)

        def run() -> None:
            try:
                loop.run(self._next_commands)
                sink.report(Stopped(None))
            except BaseException as exc:  # the loop itself broke: every waiting caller fails
                log.exception("engine thread stopped")
                sink.report(Stopped(str(exc) or type(exc).__name__))
            finally:
                self.engine.shutdown()  # the other ranks of a tensor-parallel group, if any

        self._thread = threading.Thread(target=run, name="r1serve-engine", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        check_command(command)
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        self.send(Shutdown())
        if self._thread is not None:
            self._thread.join(timeout)

    def _next_commands(self, block: bool) -> list[Command]:
        with self._wake:
            while block and not self._inbox:
                self._wake.wait()
            inbox, self._inbox = self._inbox, []
            return inbox


# ---- in a process of its own ------------------------------------------------------------------


class ProcessCore:
    """The loop in a child process (spawned: a fork of a process with torch's thread pools
    is unsafe). Commands go down a pipe from a writer thread, so a large prompt never blocks
    the event loop while the engine is mid-step; a reader thread turns the engine's messages
    to the sink. The child exits when told to, or when the pipe closes (its parent died)."""

    def __init__(self, config, model_path, replica: ReplicaSpec | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=run_engine_process, name="r1serve-engine", daemon=True,
                                 args=(config, model_path, child_conn, logging.getLogger().level, replica))
        self._child_conn = child_conn
        self._outbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._writing = False  # start() has run: commands go through the writer thread

    def spawn(self) -> None:
        """Start the process (it loads the model at once); `load` waits for it. A server
        starts its engines before importing its own stack, so that both start-ups overlap."""
        if self._proc.pid is None:
            self._proc.start()
            self._child_conn.close()  # the child holds its end; EOF on ours now means it died

    def load(self) -> EngineInfo:
        """Start the process if not yet and wait for its model to load (blocking: call it off
        the event loop)."""
        self.spawn()
        try:
            reply = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited while loading (exit code {self._proc.exitcode})") from None
        match reply:
            case EngineInfo():
                return reply
            case LoadFailed(error=error):
                self._proc.join(30)
                raise error
            case _:
                raise TypeError(f"the engine process answered its load with "
                                f"{unknown_message(reply, EngineInfo | LoadFailed)}")

    def start(self, sink: EngineSink) -> None:
        self._writing = True
        threading.Thread(target=self._read, args=(sink,), name="r1serve-engine-reader", daemon=True).start()
        threading.Thread(target=self._write, name="r1serve-engine-writer", daemon=True).start()

    def send(self, command: Command) -> None:
        check_command(command)
        self._outbox.put(command)

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def stop(self, timeout: float) -> None:
        if self._proc.pid is None:  # never started (a sibling replica failed to load first)
            return
        if self._writing:
            self.send(Shutdown())  # also ends the writer, once sent
        else:  # loaded but never started (a sibling replica failed to load)
            try:
                self._conn.send(Shutdown())
            except OSError:
                pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.warning("the engine process did not stop within %.0f s; killing it", timeout)
            self._proc.kill()  # it ignores SIGTERM (see run_engine_process)
            self._proc.join(5)

    def _write(self) -> None:
        while True:
            command = self._outbox.get()
            try:
                self._conn.send(command)
            except (OSError, ValueError):  # the process is gone; the reader reports it
                return
            if isinstance(command, Shutdown):
                return

    def _read(self, sink: EngineSink) -> None:
        while True:
            try:
                reply = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                code = self._proc.exitcode
                sink.report(Stopped(None if code == 0 else f"the engine process exited (exit code {code})"))
                return
            sink.report(reply)


def run_engine_process(config, model_path, conn, log_level: int, replica: ReplicaSpec | None = None) -> None:
    """The child process: load the model, then run the loop with the pipe as inbox and outbox."""
    # Ctrl-C reaches the whole process group, and service managers signal every process of
    # the service; the parent decides when the engine stops (after draining running
    # requests), so the child ignores both. It still ends if the parent dies: its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from r1serve.engine.llm_engine import LLMEngine

        engine = LLMEngine(config, model_path, replica)
    except BaseException as exc:
        conn.send(LoadFailed(_portable(exc)))
        return
    conn.send(EngineInfo(engine.max_model_len, str(engine.loaded.dtype).removeprefix("torch."),
                         engine.loaded.arch.vocab_size, engine.layout()))
    sink = _PipeSink(conn)

    def next_commands(block: bool) -> list[Command]:
        commands = []
        try:
            if block or conn.poll():
                commands.append(conn.recv())
                while conn.poll():
                    commands.append(conn.recv())
        except EOFError:  # the parent is gone: nobody is left to serve
            return [Shutdown()]
        return commands

    try:
        (LockstepLoop if replica else EngineLoop)(engine, sink).run(next_commands)
    except BaseException as exc:
        log.exception("engine loop stopped")
        sink.report(Stopped(str(exc) or type(exc).__name__))
        raise SystemExit(1) from None
    finally:
        engine.shutdown()  # the other ranks of a tensor-parallel group, if any
    sink.report(Stopped(None))


class _PipeSink:
    def __init__(self, conn) -> None:
        self.conn = conn

    def report(self, reply: Reply) -> None:
        try:
            self.conn.send(_for_the_pipe(reply))
        except OSError:
            if not isinstance(reply, Stopped):
                raise
            # The parent is gone: nobody is left to tell that the loop stopped.


def _for_the_pipe(reply: Reply) -> Reply:
    match reply:
        case Stepped(outputs=outputs):
            # The prompt went over once (the add, and its ids with Added); every delta carrying
            # it again would pickle 32 prompts per step. The AsyncEngine puts them back.
            for out in outputs:  # built for this step only: nobody else holds them
                out.prompt = out.prompt_token_ids = None
        case Added(error=BaseException() as error):
            return replace(reply, error=_portable(error))
    return reply


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
