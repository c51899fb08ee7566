"""A platform from another package, plugged in through the "r1serve.platforms" entry point:
installed into the test environment (its own directory on PYTHONPATH), selected by
--device, bound by the platform's own kernel table, and serving a model over HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server_process import ServerProcess

PLUGIN = Path(__file__).parent / "plugins" / "toy_platform"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """The toy platform package, pip-installed into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PLUGIN)], check=True, cwd=build, timeout=300)
    assert list(target.glob("r1serve_toy_platform-*.dist-info"))
    return target


def run_cli(args: list[str], plugin_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-m", "r1serve.cli", *args], capture_output=True, text=True,
                          env=environ, timeout=300)


def info(tiny, plugin_path, *extra, **env) -> dict:
    out = run_cli(["info", str(tiny), "--load", "--dtype", "float32", *extra], plugin_path, **env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_plugin_platform_is_chosen_and_binds_its_own_kernels(tiny, plugin_path):
    report = info(tiny, plugin_path, "--device", "toycpu")
    assert report["platform"] == "toycpu" and report["device"] == {"plugin": "r1serve-toy-platform"}
    kernels = {k["op"]: k["kernel"] for k in report["kernels"]}
    assert kernels["add_rms_norm"] == "toy"  # the plugin's table
    assert kernels["paged_attention"] == "reference"  # ops it has no kernel for keep the twins


def test_auto_tries_plugins_first_and_falls_back_when_their_device_is_absent(tiny, plugin_path):
    assert info(tiny, plugin_path)["platform"] == "toycpu"
    assert info(tiny, plugin_path, TOY_PLATFORM_ABSENT="1")["platform"] == "cpu"
    absent = run_cli(["info", str(tiny), "--load", "--device", "toycpu"], plugin_path, TOY_PLATFORM_ABSENT="1")
    assert absent.returncode != 0 and "toycpu platform plugin found no device" in absent.stderr


def test_an_unknown_device_names_the_plugins(tiny, plugin_path):
    out = run_cli(["info", str(tiny), "--load", "--device", "tpu"], plugin_path)
    assert out.returncode != 0 and "device='tpu'" in out.stderr and "toycpu" in out.stderr


def test_a_model_served_through_the_plugin_platform(tiny, plugin_path, tmp_path, monkeypatch):
    marker = tmp_path / "toy-kernel-ran"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TOY_PLATFORM_MARKER", str(marker))
    server = ServerProcess([str(tiny), "--device", "toycpu", "--dtype", "float32"], tmp_path / "server.log")
    try:
        r = httpx.post(f"{server.base}/v1/completions", timeout=120,
                       json={"model": server_model(server), "prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        assert marker.read_text().startswith("add_rms_norm on the toy platform")
    finally:
        server.stop()


def server_model(server: ServerProcess) -> str:
    return httpx.get(f"{server.base}/v1/models", timeout=10).json()["data"][0]["id"]
