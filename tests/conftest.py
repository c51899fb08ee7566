"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# ---- the real SmolLM2 GGUF ---------------------------------------------------------------------

_SMOLLM2_PULLED = Path("~/.cache/r1serve/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1: $R1SERVE_TEST_GGUF if set, else where `r1serve pull smollm2-135m` puts it."""
    override = os.environ.get("R1SERVE_TEST_GGUF")
    path = Path(override).expanduser() if override else _SMOLLM2_PULLED.expanduser()
    if not path.is_file():
        where = f"R1SERVE_TEST_GGUF={override!r} does not exist" if override else f"{path} does not exist"
        pytest.skip(f"needs the SmolLM2-135M-Instruct GGUF: {where}; run `r1serve pull smollm2-135m` "
                    "or set R1SERVE_TEST_GGUF to the .gguf file")
    return path


# ---- tiny random checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all per-op overhead: one thread avoids OpenMP threads fighting over
    two busy cores (~50x faster there). Restored so later modules run as configured."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama checkpoint in HF format (see tiny_models.py)."""
    from tiny_models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def llm(tiny):
    from r1serve import LLM

    return LLM(model=str(tiny), dtype="float32", num_kv_blocks=64, block_size=8)


# ---- a real server process -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_server(smollm2_gguf, tmp_path_factory):
    """`r1serve serve` on SmolLM2 (served as "smollm2") with the R1 reasoning parser on, so the
    reasoning split runs end to end (it answers in content unless a prompt opens <think>)."""
    from server_process import ServerProcess

    server = ServerProcess([str(smollm2_gguf), "--served-model-name", "smollm2", "--reasoning-parser", "deepseek_r1",
                            "--threads", "2", "--max-body-bytes", str(2**20)],
                           tmp_path_factory.mktemp("server") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hermes(tmp_path_factory):
    """`r1serve serve` on a tiny Qwen2 (served as "tiny") whose chat template declares tools in
    the Hermes format: tool calls through the OpenAI and Anthropic APIs."""
    from r1serve.bench.random_checkpoint import write_tokenizer
    from server_process import ServerProcess
    from tiny_models import make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("hermes"), "qwen2", max_position_embeddings=2048)
    write_tokenizer(path, tools=True)
    server = ServerProcess([str(path), "--served-model-name", "tiny", "--dtype", "float32", "--threads", "1"],
                           tmp_path_factory.mktemp("hermes-log") / "server.log")
    yield server
    server.stop()


# ---- the key and usage databases: a SQLite file, and PostgreSQL when one can be had ---------------


@pytest.fixture()
def db(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'platform.db'}"


@pytest.fixture(scope="module")
def pg_url():
    url = os.environ.get("R1SERVE_TEST_PG_URL")
    if not url:  # start the machine's own (installing Debian's package if need be)
        script = Path(__file__).parents[1] / "scripts" / "start_postgres.sh"
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
        url = done.stdout.strip()
        if done.returncode != 0 or not url:
            pytest.skip(f"no PostgreSQL ({done.stderr.strip()[-300:]}); set R1SERVE_TEST_PG_URL to use one")
    import sqlalchemy as sa

    from r1serve.accounts.database import metadata

    engine = sa.create_engine(url)
    with engine.begin() as conn:  # a clean schema for this run: every table r1serve has
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {', '.join(metadata.tables)} CASCADE"))
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'platform.db'}"
    return request.getfixturevalue("pg_url")


# ---- the CPU kernels, once per vector ISA this machine runs ----------------------------------


def _runnable_isas():
    from r1serve.kernels.cpu_isa import runnable_isas

    return runnable_isas()


@pytest.fixture(scope="session", params=_runnable_isas())
def isa_kernels(request):
    """The CPU kernels built for each ISA this CPU runs (an AVX512 machine: avx512, avx2 and
    scalar), so that every path is tested where it can run."""
    from r1serve.kernels.cpu_extension import cpu_kernels

    module = cpu_kernels(request.param)
    if module is None:
        pytest.skip(f"the {request.param} build of the CPU kernels could not be compiled here")
    assert module.isa() == request.param, f"the {request.param} build compiled to {module.isa()}"
    return module
