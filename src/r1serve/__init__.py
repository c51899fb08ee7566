"""r1serve: self-hostable serving for DeepSeek-R1 and its family."""
from __future__ import annotations

from r1serve.outputs import CompletionOutput, Logprob, RequestOutput
from r1serve.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `LLM` pulls in torch and the model code; importing r1serve.engine.* alone should not.
    if name == "LLM":
        from r1serve.llm import LLM

        return LLM
    raise AttributeError(f"module 'r1serve' has no attribute {name!r}")
