"""Errors r1serve raises for bad input. Each message names the bad value and the fix."""


class R1ServeError(Exception):
    """Base class: anything r1serve rejects on purpose."""


class ModelLoadError(R1ServeError):
    """A model name, file or checkpoint that cannot be loaded."""


class InvalidRequestError(R1ServeError, ValueError):
    """A request (prompt or sampling parameters) the engine refuses before any work starts."""


class RankFailedError(RuntimeError):
    """A rank of the group died or a collective failed: the ranks are out of step and the
    engine cannot serve on; its requests fail and it reports itself unhealthy."""


class EngineDeadError(RuntimeError):
    """The engine (its thread or its process) has stopped; no request can run."""
