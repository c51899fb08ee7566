"""The engine core's messages and loop at their seams: a stand-in engine, hand-made commands,
and the replies as the AsyncEngine (or the engine process's pipe) receives them."""
from __future__ import annotations

import dataclasses
import pickle

import pytest

from r1serve import SamplingParams
from r1serve.engine.async_engine import AsyncEngine
from r1serve.engine.engine_stats import EngineStats
from r1serve.engine.core_messages import (AbortRequest, Added, AddRequest, EngineInfo, Failed,
                                          LoadFailed, Shutdown, Stepped, Stopped)
from r1serve.engine.engine_core import EngineLoop, ProcessCore, ThreadCore, _PipeSink
from r1serve.errors import InvalidRequestError
from r1serve.outputs import CompletionOutput, RequestOutput

PARAMS = SamplingParams(temperature=0.5, top_k=5, stop=("x",), max_tokens=4)


def output(rid: str, finished: bool = True) -> RequestOutput:
    return RequestOutput(rid, "hi", [5, 6], [CompletionOutput(0, " yo", [7], "length" if finished else None)],
                         finished, 0, {"arrival_time": 1.0})


class FakeEngine:
    """LLMEngine as the loop sees it: every request finishes in one step."""

    def __init__(self) -> None:
        self.running: list[str] = []
        self.added: list[str] = []
        self.step_error: Exception | None = None

    def add_request(self, request_id, prompt, params) -> list[int]:
        if prompt == "bad":
            raise InvalidRequestError("prompt 'bad' is refused")
        self.added.append(request_id)
        self.running.append(request_id)
        return [5, 6]

    def abort_request(self, request_id) -> None:
        if request_id in self.running:
            self.running.remove(request_id)

    def abort_all(self) -> list[str]:
        ids, self.running = self.running, []
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        if self.step_error is not None:
            raise self.step_error
        outs, self.running = [output(rid) for rid in self.running], []
        return outs

    def stats(self) -> EngineStats:
        return EngineStats()


class Recorder:
    def __init__(self) -> None:
        self.replies: list = []

    def report(self, reply) -> None:
        self.replies.append(reply)


def run_loop(engine: FakeEngine, batches: list[list]) -> list:
    """Run the loop over these command batches, then a Shutdown; returns its replies."""
    pending = list(batches)
    sink = Recorder()
    EngineLoop(engine, sink).run(lambda block: pending.pop(0) if pending else [Shutdown()])
    return sink.replies


# ---- the loop -------------------------------------------------------------------------------------


def test_the_loop_answers_each_add_and_reports_each_step():
    engine = FakeEngine()
    replies = run_loop(engine, [[AddRequest("a", "hi", PARAMS), AddRequest("b", "bad", PARAMS),
                                 AbortRequest("nobody")]])
    added_a, added_b, stepped = replies
    assert added_a == Added("a", None, [5, 6])
    assert added_b.request_id == "b" and added_b.prompt_token_ids is None
    assert isinstance(added_b.error, InvalidRequestError) and "refused" in str(added_b.error)
    assert isinstance(stepped, Stepped) and [o.request_id for o in stepped.outputs] == ["a"]
    assert stepped.stats.num_steps == 1


def test_an_abort_is_applied_before_the_next_step():
    engine = FakeEngine()
    replies = run_loop(engine, [[AddRequest("a", "hi", PARAMS), AbortRequest("a")]])
    assert [type(r) for r in replies] == [Added, Stepped] and replies[1].outputs == []


def test_a_failed_step_fails_its_requests_and_the_loop_goes_on():
    engine = FakeEngine()
    engine.step_error = RuntimeError("device fell over")
    replies = run_loop(engine, [[AddRequest("a", "hi", PARAMS)], [AbortRequest("a")]])
    assert [type(r) for r in replies] == [Added, Failed, Stepped, Stepped]
    assert replies[1] == Failed(["a"], "engine step failed: device fell over")


def test_shutdown_ends_the_loop_and_what_came_with_it_is_not_applied():
    engine = FakeEngine()
    assert run_loop(engine, [[AddRequest("a", "hi", PARAMS), Shutdown()], [AddRequest("b", "hi", PARAMS)]]) == []
    assert engine.added == []


def test_the_loop_rejects_a_command_it_does_not_know():
    with pytest.raises(TypeError, match="not an engine core command: got tuple, expected one of "
                                        "AddRequest, AbortRequest, Shutdown"):
        run_loop(FakeEngine(), [[("abort", "a")]])


# ---- the cores and the AsyncEngine refuse what is not a message ---------------------------------


@pytest.mark.parametrize("make_core", [lambda: ThreadCore(FakeEngine()), lambda: ProcessCore(None, None)],
                         ids=["thread", "process"])
def test_a_core_refuses_a_command_of_an_unknown_type_where_it_is_sent(make_core):
    core = make_core()  # never started: the check is in send(), before anything is queued
    with pytest.raises(TypeError, match="not an engine core command: got tuple, expected one of "
                                        "AddRequest, AbortRequest, Shutdown"):
        core.send(("add", "r", "hi", PARAMS))
    with pytest.raises(TypeError, match="got Added, expected"):  # a reply is not a command either
        core.send(Added("r", None, [1]))
    core.send(AbortRequest("r"))
    queued = core._inbox if isinstance(core, ThreadCore) else [core._outbox.get_nowait()]
    assert queued == [AbortRequest("r")]


def test_the_async_engine_refuses_a_reply_of_an_unknown_type():
    engine = AsyncEngine(ThreadCore(FakeEngine()), tokenizer=None, max_model_len=16, vocab_size=16)
    with pytest.raises(TypeError, match="not an engine core reply: got tuple, expected one of "
                                        "Added, Stepped, Failed, Stopped"):
        engine.report(("stepped", [], EngineStats()))
    with pytest.raises(TypeError, match="got AddRequest, expected"):
        engine.report(AddRequest("r", "hi", PARAMS))


# ---- across the process pipe ----------------------------------------------------------------------


MESSAGES = [AddRequest("r", {"prompt_token_ids": [1, 2]}, PARAMS), AddRequest("r", "hello", SamplingParams()),
            AbortRequest("r"), Shutdown(), EngineInfo(2048), Added("r", None, [1, 2]),
            Stepped([output("a", False), output("b")], EngineStats(2, 1, 0.25, 64, 48, 10, 4, 3, 7)),
            Stepped([], EngineStats()), Failed(["a", "b"], "engine step failed: boom"), Stopped(None),
            Stopped("the engine process exited (exit code -9)")]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_survive_pickling(message):
    assert pickle.loads(pickle.dumps(message)) == message


@pytest.mark.parametrize("message", [Added("r", InvalidRequestError("outside the vocabulary"), None),
                                     LoadFailed(InvalidRequestError("no such model"))], ids=lambda m: type(m).__name__)
def test_messages_carrying_an_error_survive_pickling(message):
    back = pickle.loads(pickle.dumps(message))
    assert type(back) is type(message) and type(back.error) is InvalidRequestError
    assert str(back.error) == str(message.error)


@pytest.mark.parametrize("message", MESSAGES + [LoadFailed(RuntimeError("x"))],
                         ids=lambda m: type(m).__name__)
def test_messages_are_frozen_and_slotted(message):
    # Slots: no per-message __dict__ on the hot path; frozen: a message never changes in flight.
    assert not hasattr(message, "__dict__")
    for field in dataclasses.fields(message):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(message, field.name, None)


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.callback = lambda: None  # lambdas do not pickle


class PipeEnd:
    """The parent's view of the pipe: what it would receive, pickled and unpickled."""

    def __init__(self, error: OSError | None = None) -> None:
        self.received: list = []
        self.error = error

    def send(self, obj) -> None:
        if self.error is not None:
            raise self.error
        self.received.append(pickle.loads(pickle.dumps(obj)))


def test_the_pipe_carries_each_prompt_once_and_only_errors_that_unpickle():
    conn = PipeEnd()
    sink = _PipeSink(conn)
    sink.report(Added("a", Unpicklable("tokenizer broke"), None))
    sink.report(Stepped([output("a")], EngineStats()))
    added, stepped = conn.received
    assert type(added.error) is RuntimeError and str(added.error) == "Unpicklable: tokenizer broke"
    (out,) = stepped.outputs
    # The AsyncEngine puts the prompt back from the add; the output itself is unchanged otherwise.
    assert out.prompt is None and out.prompt_token_ids is None and out.outputs[0].token_ids == [7]


def test_the_pipe_sink_tells_of_a_stop_only_while_someone_listens():
    sink = _PipeSink(PipeEnd(BrokenPipeError("the parent is gone")))
    sink.report(Stopped(None))  # nobody to tell: no error
    with pytest.raises(BrokenPipeError):  # anything else: the loop must learn the parent is gone
        sink.report(Stepped([], EngineStats()))
