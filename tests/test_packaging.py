"""How r1serve installs and starts: the CLI's parser imports nothing heavy, and a wheel
(not the editable checkout) carries everything the package reads at run time, the CPU
kernels' headers included."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "src" / "r1serve" / "kernels" / "csrc"
HEAVY = ("torch", "numpy", "fastapi", "starlette", "uvicorn", "httpx", "transformers", "sqlalchemy", "tqdm",
         "r1serve.bench.serve", "r1serve.bench.serve_client", "r1serve.server", "r1serve.engine")


def test_building_the_parser_imports_nothing_heavy():
    # In a fresh interpreter: this test process has imported torch long ago.
    code = ("import sys; from r1serve.cli import build_parser; build_parser(); "
            f"print(sorted(m for m in sys.modules if m in {HEAVY!r} or m.split('.')[0] in {HEAVY!r}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"building the parser imported {loaded}"


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "r1serve.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("pull", "generate", "chat", "serve", "keys", "usage", "info", "bench", "hw"):
        assert command in out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from the project's files alone: the checkout's build/ and egg-info/ of
    earlier installs would put files into it that the package data does not name."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    (path,) = out.glob("r1serve-*.whl")
    return path


def included_headers() -> set[str]:
    """Every local header a kernel source includes, followed through headers."""
    todo, seen = [p.name for p in CSRC.glob("*.cpp")], set()
    while todo:
        text = (CSRC / todo.pop()).read_text()
        for name in re.findall(r'#include\s+"([^"]+)"', text):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_wheel_carries_what_the_package_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {f"r1serve/kernels/csrc/{p.name}" for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")}
    needed |= {f"r1serve/kernels/csrc/{h}" for h in included_headers()}
    static = ROOT / "src" / "r1serve" / "server" / "static"
    needed |= {f"r1serve/server/static/{p.relative_to(static).as_posix()}" for p in static.rglob("*") if p.is_file()}
    needed |= {"r1serve/planner/accelerators.toml", "r1serve/planner/model_configs/deepseek-r1.json",
               "r1serve/accounts/prices.toml"}
    assert included_headers(), "the kernels include local headers; this test must see them"
    assert needed <= names, f"missing from the wheel: {sorted(needed - names)}"


def test_kernels_build_from_an_installed_wheel(wheel, tmp_path):
    """Install the wheel into a directory of its own and build the CPU kernels from there,
    with an empty extensions cache, so nothing of the checkout can stand in for it."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import r1serve, pathlib; from r1serve.kernels.cpu_extension import cpu_kernels; "
            "print(pathlib.Path(r1serve.__file__).parent); print(cpu_kernels() is not None)")
    env = dict(os.environ, PYTHONPATH=str(target), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    where, built = done.stdout.split()
    assert Path(where) == target / "r1serve", f"imported the checkout ({where}), not the wheel"
    assert built == "True", f"the CPU kernels did not build from the wheel:\n{done.stderr[-3000:]}"
