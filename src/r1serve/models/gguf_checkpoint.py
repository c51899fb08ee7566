"""A GGUF file read as a Hugging Face checkpoint: a config.json-shaped dict and HF-named weights.

GGUF (llama.cpp's format) stores one file with metadata under `{arch}.*` / `tokenizer.*` keys
and tensors under llama.cpp names (`blk.3.attn_q.weight`). We translate both to what
`transformers` would hold for the same model, so the model code only ever sees HF names.

Tensor layout: GGUF lists dims innermost-first (ne0, ne1); the reader's numpy shape is the
reverse, which is already HF's (out_features, in_features). Quantized tensors are raw
blocks of bytes, one row of blocks per output feature. The file is memory-mapped; a tensor
the platform packs in its own form is handed over as those rows of blocks (a BlockTensor,
no float copy), any other is dequantized one at a time. Once a tensor has been read its
pages are given back (madvise), so that loading holds about one tensor of the file beside
the weights it has built, not the whole file twice.
"""

from __future__ import annotations

import functools
import mmap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from r1serve.errors import ModelLoadError
from r1serve.kernels.quant_formats import GGML_FORMATS, BlockTensor
from r1serve.models.checkpoint_slice import SKIP, SliceOf, TensorSlice, whole
from r1serve.models.gguf_file import GGUFFile

if TYPE_CHECKING:
    import torch

    from r1serve.tokenizer import Tokenizer

Q = GGMLQuantizationType

# Every type here dequantizes through gguf.quants in numpy; the K-quants and legacy block
# quants are what llama.cpp's usual presets (Q4_K_M, Q5_K_M, Q8_0, ...) are made of.
SUPPORTED_TENSOR_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)

_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Llama-3.1 files carry precomputed rotary frequency factors; HF derives them from the config
# instead, so the tensor has no HF counterpart.
_IGNORED_TENSORS = frozenset({"rope_freqs.weight"})

_PER_TOKEN_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.merges")

_FLOAT_DTYPE_NAMES = {Q.F16: "float16", Q.BF16: "bfloat16"}

class GGUFCheckpoint:
    def __init__(self, path: Path, file: GGUFFile):
        self.path = path
        self.file = file
        self.architecture: str = self._field("general.architecture")
        self._tensor_names = {t.name for t in file.tensors}
        self._tokenizer: Tokenizer | None = None

    @classmethod
    def open(cls, path: str | Path) -> GGUFCheckpoint:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist (expected a path to a .gguf file).")
        try:
            file = GGUFFile(path)
        except Exception as exc:  # the reader fails in many ways (ValueError, struct.error, ...) on bad bytes
            raise ModelLoadError(
                f"{str(path)!r} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                "it may be truncated or not a GGUF at all. Download it again."
            ) from exc
        if "general.architecture" not in file.metadata:
            raise ModelLoadError(f"GGUF file {str(path)!r} has no general.architecture key; it is not a model file.")
        checkpoint = cls(path, file)
        checkpoint._validate()
        return checkpoint

    # ---- metadata -------------------------------------------------------------------------

    def _field(self, key: str, default: Any = None) -> Any:
        return self.file.metadata.get(key, default)

    def _arch_field(self, key: str, default: Any = None) -> Any:
        return self._field(f"{self.architecture}.{key}", default)

    def _validate(self) -> None:
        if self.architecture not in _HF_ARCHITECTURES:
            raise ModelLoadError(
                f"GGUF architecture {self.architecture!r} in {str(self.path)!r} is not supported; "
                f"supported: {sorted(_HF_ARCHITECTURES)}."
            )
        for tensor in self.file.tensors:
            if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
                raise ModelLoadError(
                    f"tensor {tensor.name!r} in {str(self.path)!r} has type {tensor.tensor_type.name}, which r1serve "
                    f"cannot dequantize; supported types: {sorted(t.name for t in SUPPORTED_TENSOR_TYPES)}."
                )
            if tensor.name not in _IGNORED_TENSORS and _hf_name(tensor.name) is None:
                raise ModelLoadError(
                    f"tensor {tensor.name!r} in {str(self.path)!r} has no place in a {self.architecture} model; "
                    "the file is not a plain Llama/Qwen2 checkpoint."
                )

    def _required(self, key: str) -> Any:
        value = self._arch_field(key)
        if value is None:
            raise ModelLoadError(f"GGUF file {str(self.path)!r} lacks the {self.architecture}.{key} metadata key.")
        return value

    @property
    def hf_config(self) -> dict[str, Any]:
        hidden_size = self._required("embedding_length")
        num_heads = self._required("attention.head_count")
        rope_theta = float(self._arch_field("rope.freq_base", 10000.0))
        config: dict[str, Any] = {
            "architectures": [_HF_ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "hidden_size": hidden_size,
            "intermediate_size": self._required("feed_forward_length"),
            "num_hidden_layers": self._required("block_count"),
            "num_attention_heads": num_heads,
            "num_key_value_heads": self._arch_field("attention.head_count_kv", num_heads),
            "head_dim": self._head_dim(hidden_size, num_heads),
            "hidden_act": "silu",
            "rms_norm_eps": self._required("attention.layer_norm_rms_epsilon"),
            "rope_theta": rope_theta,
            "rope_scaling": self._rope_scaling(),
            "max_position_embeddings": self._required("context_length"),
            "vocab_size": self._vocab_size(),
            "tie_word_embeddings": "output.weight" not in self._tensor_names,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
            "torch_dtype": self._torch_dtype(),
        }
        # transformers >= 5 reads rotary settings from rope_parameters; older versions from the
        # two keys above. Writing both keeps the dict loadable by either.
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta, **(config["rope_scaling"] or {})}
        if self.architecture == "llama":
            config["attention_bias"] = "blk.0.attn_q.bias" in self._tensor_names
            config["mlp_bias"] = False
        return config

    def _head_dim(self, hidden_size: int, num_heads: int) -> int:
        # key_length is explicit when head_dim != hidden/heads; llama files say it via the rotary
        # dimension instead (llama rotates the whole head).
        explicit = self._arch_field("attention.key_length")
        if explicit is None and self.architecture == "llama":
            explicit = self._arch_field("rope.dimension_count")
        return int(explicit) if explicit is not None else hidden_size // num_heads

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind = self._arch_field("rope.scaling.type")
        if kind in (None, "none"):
            return None
        scaling = {"rope_type": kind, "factor": float(self._arch_field("rope.scaling.factor", 1.0))}
        original = self._arch_field("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        return scaling

    def _vocab_size(self) -> int:
        declared = self._arch_field("vocab_size")
        if declared is not None:
            return int(declared)
        embedding = [t for t in self.file.tensors if t.name == "token_embd.weight"]
        if not embedding:
            raise ModelLoadError(f"GGUF file {str(self.path)!r} has no token_embd.weight tensor.")
        return int(embedding[0].shape[1])  # GGUF dims are (hidden, vocab)

    @property
    def is_quantized(self) -> bool:
        """True when some matrix is stored below 16 bits: "auto" dtype then means the
        platform's fast half type, not the float32 the file dequantizes to."""
        plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
        return any(t.tensor_type not in plain for t in self.file.tensors if len(t.shape) == 2)

    def block_types(self) -> dict[str, int]:
        """HF name -> ggml type id of every matrix stored in a block format that has a packed
        form (kernels/quant_formats.py's GGML_FORMATS); the others dequantize."""
        return {name: int(t.tensor_type) for t in self.file.tensors
                if len(t.shape) == 2 and int(t.tensor_type) in GGML_FORMATS and (name := _hf_name(t.name)) is not None}

    def tensor_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.file.tensors)

    def _torch_dtype(self) -> str:
        # A file of plain float matrices keeps its dtype. For quantized files transformers leaves
        # the dtype unset and loads float32, the dtype we dequantize to.
        matrix_types = {t.tensor_type for t in self.file.tensors if len(t.shape) == 2}
        if len(matrix_types) == 1:
            return _FLOAT_DTYPE_NAMES.get(matrix_types.pop(), "float32")
        return "float32"

    # ---- weights --------------------------------------------------------------------------

    def iter_weights(self, select: SliceOf = whole,
                     as_blocks: Callable[[str], bool] = lambda name: False) -> Iterator[tuple[str, torch.Tensor | BlockTensor]]:
        """Yield (HF name, tensor) in file order, one tensor alive at a time: a BlockTensor for
        the names `as_blocks` takes (stored in a block format with a packed form, and sliced
        on block edges), float32 otherwise. `select` says what of each tensor this rank reads
        (checkpoint_slice.py)."""
        for tensor in self.file.tensors:
            name = _hf_name(tensor.name)
            part = select(name) if name is not None else SKIP
            if part == SKIP:
                continue
            data, aligned = _sliced(tensor.data, tensor.tensor_type, part)
            if aligned and as_blocks(name) and int(tensor.tensor_type) in GGML_FORMATS:
                # Read when the platform packs it (with its module's other parts, later):
                # the pages are given back then.
                yield name, self._blocks(tensor, data)
            else:
                floats = self._floats(tensor.name, data, tensor.tensor_type, part)
                self._release(tensor)
                yield name, floats

    def _floats(self, gguf_name: str, data: np.ndarray, tensor_type: GGMLQuantizationType,
                part: TensorSlice | None) -> torch.Tensor:
        import torch  # here, not at the top: the server process reads headers without torch

        weights = self._undo_rotary_permute(gguf_name, _dequantize(data, tensor_type))
        if part is not None and part.dim == 1 and weights.shape[1] != part.stop - part.start:
            weights = np.ascontiguousarray(weights[:, slice(*part.clipped(weights.shape[1]))])
        return torch.from_numpy(weights)

    def _blocks(self, tensor, data: np.ndarray) -> BlockTensor:
        import torch

        # Rows of blocks are rows of the weight: the rotary reordering moves them whole.
        raw = self._undo_rotary_permute(tensor.name, data)
        block, nbytes = GGML_QUANT_SIZES[tensor.tensor_type]
        with warnings.catch_warnings():  # a read-only view of the mapped file; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.from_numpy(raw)
        return BlockTensor(rows, int(tensor.tensor_type), (raw.shape[0], raw.shape[1] // nbytes * block),
                           functools.partial(self._release, tensor))

    def _release(self, tensor) -> None:
        # The pages of a tensor read through the map count as this process's memory until
        # unmapped; the page cache keeps them for the next start either way.
        start = -(-int(tensor.data_offset) // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (int(tensor.data_offset) + int(tensor.n_bytes)) // mmap.PAGESIZE * mmap.PAGESIZE
        handle = getattr(self.file.map, "_mmap", None)
        if handle is not None and end > start and hasattr(mmap, "MADV_DONTNEED"):
            handle.madvise(mmap.MADV_DONTNEED, start, end - start)

    def read_tensor(self, gguf_name: str) -> torch.Tensor:
        """One tensor by its GGUF name, dequantized to float32, without any HF reordering."""
        import torch

        for tensor in self.file.tensors:
            if tensor.name == gguf_name:
                return torch.from_numpy(_dequantize(tensor.data, tensor.tensor_type))
        raise ModelLoadError(f"no tensor named {gguf_name!r} in {str(self.path)!r}.")

    def _undo_rotary_permute(self, gguf_name: str, weights: np.ndarray) -> np.ndarray:
        # llama.cpp's converter reorders each Llama q/k head from HF's "rotate half" layout
        # (first half of the head dims paired with the second half) to interleaved pairs
        # (0,1), (2,3), ... that ggml's rope expects. Qwen2 files keep HF's layout. Rows
        # move whole, so the same reordering serves floats and rows of blocks.
        #   HF row order per head:   [x0 x1 .. x(d/2-1) | y0 y1 .. y(d/2-1)]
        #   GGUF row order per head: [x0 y0 x1 y1 ...]
        if self.architecture != "llama":
            return weights
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
        if kind not in ("attn_q", "attn_k"):
            return weights
        head_dim = self._head_dim(self._required("embedding_length"), self._required("attention.head_count"))
        heads = weights.shape[0] // head_dim  # a rank's slice holds whole heads
        per_head = weights.reshape(heads, head_dim // 2, 2, *weights.shape[1:])  # (h, d/2, pair, in)
        return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(weights.shape)  # (h, pair, d/2, in)

    def tokenizer(self) -> Tokenizer:
        """The file's tokenizer, built once. The metadata of one entry per token or merge
        then goes (Python strings: tens of MB for Qwen's 152k vocabulary), as nothing else
        reads it."""
        from r1serve.tokenizer import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_gguf(self.file.metadata)
            for key in _PER_TOKEN_FIELDS:
                self.file.metadata.pop(key, None)
        return self._tokenizer


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    return None


def _sliced(data: np.ndarray, tensor_type: GGMLQuantizationType,
            part: TensorSlice | None) -> tuple[np.ndarray, bool]:
    """The raw rows (or block columns) a slice needs, before dequantizing, and whether they
    are exactly the slice: each row of a quantized tensor is a row of blocks of block_size
    weights, so rows slice as they are, and columns where the slice falls on block edges
    (else the whole tensor comes back, for the caller to slice once dequantized)."""
    if part is None:
        return data, True
    if part.dim == 0:
        return data[slice(*part.clipped(data.shape[0]))], True
    block, nbytes = GGML_QUANT_SIZES[tensor_type]
    if part.start % block or part.stop % block:
        return data, False
    per = nbytes if data.dtype == np.uint8 else 1  # raw bytes, or one element per weight
    return data[:, part.start // block * per:part.stop // block * per], True


def _dequantize(data: np.ndarray, tensor_type: GGMLQuantizationType) -> np.ndarray:
    weights = dequantize(data, tensor_type)
    # F32 comes back as a read-only view of the memory-mapped file; torch needs its own copy.
    if not weights.flags.writeable:
        weights = weights.copy()
    return weights.astype(np.float32, copy=False)
