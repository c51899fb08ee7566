"""Model classes keyed by the architecture name a checkpoint's config.json gives."""
from __future__ import annotations

from torch import nn

from r1serve.errors import ModelLoadError
from r1serve.models.deepseek_v3 import DeepseekV3ForCausalLM
from r1serve.models.llama import LlamaForCausalLM
from r1serve.models.qwen2 import Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ModelLoadError(f"architecture {architecture!r} is not supported; "
                             f"supported: {', '.join(sorted(MODEL_REGISTRY))}") from None
