"""One model over several ranks (tensor and expert parallelism, torch.distributed on gloo)
and several engine replicas (data parallelism): the same greedy tokens as one rank, logprobs
within 1e-4 in float32, offline and through the server; sharded loading; dead ranks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch

from tiny_models import make_checkpoint, make_deepseek_v3

from r1serve import LLM, SamplingParams
from r1serve.config import EngineConfig
from r1serve.engine.data_parallel import ReplicaRouter
from r1serve.errors import InvalidRequestError, ModelLoadError

PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog. " * 4, "r1serve"]
STEPS = 32
ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_memory_gib=0.05, block_size=8)

MODELS = {
    "llama": lambda p: make_checkpoint(p, "llama"),
    # One KV head for two ranks (replicated); a vocabulary that does not split evenly (padded).
    "qwen2": lambda p: make_checkpoint(p, "qwen2", num_key_value_heads=1, vocab_size=387),
    # MLA + DeepSeekMoE with group-limited routing (4 groups, 2 chosen) and a dense first layer.
    "deepseek_v3": lambda p: make_deepseek_v3(p, n_group=4, topk_group=2),
}
LAYOUTS = {
    "tp2": dict(tensor_parallel_size=2),
    "ep2": dict(tensor_parallel_size=2, expert_parallel=True),
    "dp2": dict(data_parallel_size=2),
}
CASES = [(m, lay) for m in MODELS for lay in LAYOUTS if lay != "ep2" or m == "deepseek_v3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return {name: make(root / name) for name, make in MODELS.items()}


def greedy(path: Path, **layout) -> list[tuple[list[int], list[float], str]]:
    """Each prompt's greedy tokens, their logprobs and its text."""
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0)
    with LLM(str(path), **ENGINE, **layout) as llm:
        return [completion(o.outputs[0]) for o in llm.generate(PROMPTS, params)]


def completion(out) -> tuple[list[int], list[float], str]:
    return list(out.token_ids), [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)], out.text


@pytest.fixture(scope="module")
def one_rank(checkpoints):
    return {name: greedy(path) for name, path in checkpoints.items()}


def assert_same(got, want, by: int = 0) -> None:
    """Same tokens (by=0; by=2: same text, what the API returns) and logprobs within 1e-4."""
    for g, w in zip(got, want, strict=True):
        assert g[by] == w[by]
        assert max(abs(a - b) for a, b in zip(g[1], w[1], strict=True)) < 1e-4


@pytest.mark.parametrize("model,layout", CASES)
def test_offline_matches_one_rank(checkpoints, one_rank, model, layout):
    assert_same(greedy(checkpoints[model], **LAYOUTS[layout]), one_rank[model])


def test_dp_attention_replicas_split_the_experts(checkpoints):
    # DP attention: two replicas, one rank each, their MoE layers one expert-parallel group.
    # Requests of unequal lengths: a replica whose own are done runs idle steps while the
    # other's still need its experts.
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for n in (32, 3, 17)]
    runs = []
    for layout in ({}, dict(data_parallel_size=2, expert_parallel=True)):
        with LLM(str(checkpoints["deepseek_v3"]), **ENGINE, **layout) as llm:
            runs.append([completion(o.outputs[0]) for o in llm.generate(PROMPTS, params)])
            if layout:
                assert [info.layout.replica for info in llm.engine.core.infos] == [(0, 2), (1, 2)]
                assert [info.layout.experts for info in llm.engine.core.infos] == [(0, 4), (4, 8)]
    assert_same(runs[1], runs[0])


@pytest.mark.parametrize("layout", ["tp2", "ep2", "dp2"])
def test_mtp_drafts_on_every_layout(checkpoints, one_rank, layout):
    # The MTP layer is sharded like the others and every rank runs its passes (rank 0 sends
    # them as it sends steps); independent replicas each draft for their own requests.
    # Greedy speculation is lossless: the tokens are one rank's without drafts.
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    with LLM(str(checkpoints["deepseek_v3"]), **ENGINE, **LAYOUTS[layout], speculative="mtp",
             num_speculative_tokens=2) as llm:
        got = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
        stats = llm.engine.stats()
    assert got == [tokens for tokens, _, _ in one_rank["deepseek_v3"]]
    assert stats.spec_num_drafts > 0
    assert stats.num_free_blocks == stats.num_kv_blocks  # no block left behind, on any replica


def test_tensor_and_data_parallel_together(checkpoints, one_rank):
    assert_same(greedy(checkpoints["deepseek_v3"], data_parallel_size=2, tensor_parallel_size=2,
                       expert_parallel=True), one_rank["deepseek_v3"])


def test_layouts_that_cannot_split_are_refused_clearly(checkpoints, tmp_path):
    with pytest.raises(ModelLoadError, match="rank|divide|split"):
        LLM(str(checkpoints["llama"]), **ENGINE, tensor_parallel_size=3)  # 4 heads over 3 ranks
    with pytest.raises(InvalidRequestError, match="expert_parallel"):
        EngineConfig(model="m", cache_dir=tmp_path, expert_parallel=True)  # one rank, one replica
    with pytest.raises(InvalidRequestError, match="data_parallel_size"):
        EngineConfig(model="m", cache_dir=tmp_path, data_parallel_size=0)


def test_gguf_tensor_parallel_matches_one_rank(smollm2_gguf):
    # Three ranks: SmolLM2 has 9 heads and 3 KV heads. Quantized blocks split by rows (q/k/v,
    # gate/up, the vocabulary) and by whole blocks of columns (o_proj, down_proj).
    from r1serve.kernels.quantized_weight import dequantize

    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0)
    opts = dict(dtype="float32", max_model_len=512, kv_cache_memory_gib=0.1)
    # Dense weights dequantized from each rank's blocks: the sums differ only in their order.
    runs = []
    for tp in (1, 3):
        with LLM(str(smollm2_gguf), **opts, quantization="none", tensor_parallel_size=tp) as llm:
            runs.append(completion(llm.generate(["The capital of France is"], params)[0].outputs[0]))
    assert_same(runs[1:], runs[:1])
    # The quantized kernels: each rank's packed weights are exactly its slice of one rank's. (Their greedy
    # tokens may part after a few steps: the activations' int8 rounding magnifies the ULPs
    # by which the all-reduced sums differ, as in any tensor-parallel engine's quantized GEMMs.)
    with LLM(str(smollm2_gguf), **opts) as one, LLM(str(smollm2_gguf), **opts, tensor_parallel_size=3) as three:
        whole, part = (dict(llm.engine.loaded.model.named_modules()) for llm in (one, three))
        layer = "model.layers.3."
        w = {n: dequantize(whole[layer + n].quantized) for n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                                     "mlp.gate_up_proj", "mlp.down_proj")}
        got = {n: dequantize(part[layer + n].quantized) for n in w}
        q, kv = 3 * 64, 64  # rank 0's heads: 3 of 9 query heads, 1 of 3 KV heads
        assert torch.equal(got["self_attn.qkv_proj"], torch.cat([w["self_attn.qkv_proj"][:q],
                                                                 w["self_attn.qkv_proj"][576:576 + kv],
                                                                 w["self_attn.qkv_proj"][768:768 + kv]]))
        assert torch.equal(got["self_attn.o_proj"], w["self_attn.o_proj"][:, :q])
        assert torch.equal(got["mlp.gate_up_proj"], torch.cat([w["mlp.gate_up_proj"][:512],
                                                               w["mlp.gate_up_proj"][1536:1536 + 512]]))
        assert torch.equal(got["mlp.down_proj"], w["mlp.down_proj"][:, :512])
        assert torch.equal(dequantize(part["lm_head"].quantized), dequantize(whole["lm_head"].quantized)[:16384])


# ---- the replica router -------------------------------------------------------------------------


def test_router_balances_and_keeps_shared_prefixes_together():
    router = ReplicaRouter(2, slack=2)
    system = "You are a helpful assistant. " * 20
    first = router.pick("a", system + "question 1")
    assert all(router.pick(f"s{i}", system + f"question {i}") == first for i in range(2, 4))
    # Other prompts fill the other replica first: least open requests.
    assert {router.pick(f"o{i}", f"unrelated {i} " * 30) for i in range(3)} == {1 - first}
    # The affine replica is now more than `slack` busier: the next shared-prefix request spills.
    router.pick("x1", system + "q")  # loads: first 4, other 3
    for rid in ("o0", "o1", "o2"):
        router.done(rid)  # other 0
    assert router.pick("spill", system + "question 9") == 1 - first
    router.done("never-picked")  # harmless
    assert router.load[first] == 4 and router.load[1 - first] == 1


# ---- the server, driven by the openai SDK -------------------------------------------------------


@pytest.mark.parametrize("model,layout", [("llama", "tp2"), ("deepseek_v3", "ep2"), ("qwen2", "dp2"),
                                          ("deepseek_v3", "dp2-attention")])
def test_server_matches_one_rank(checkpoints, one_rank, tmp_path, model, layout):
    import openai
    from server_process import ServerProcess

    flags = {"tp2": ["-tp", "2"], "ep2": ["-tp", "2", "--expert-parallel"], "dp2": ["-dp", "2"],
             "dp2-attention": ["-dp", "2", "--expert-parallel"]}[layout]
    server = ServerProcess([str(checkpoints[model]), "--served-model-name", "m", "--dtype", "float32",
                            "--max-model-len", "256", "--kv-cache-memory", "0.05", *flags], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none")
        got = []
        for prompt in PROMPTS:
            out = client.completions.create(model="m", prompt=prompt, max_tokens=STEPS, temperature=0, logprobs=0,
                                            extra_body={"ignore_eos": True})
            choice = out.choices[0]
            got.append((None, choice.logprobs.token_logprobs, choice.text))
        assert_same(got, one_rank[model], by=2)
        assert httpx.get(f"{server.base}/health").json()["status"] == "ok"
    finally:
        server.stop()
    assert worker_pids(server.proc.pid) == []


# ---- faults -------------------------------------------------------------------------------------


def worker_pids(ancestor: int | None = None) -> list[int]:
    """The tensor-parallel worker processes alive on this machine (under `ancestor`, if given)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if b"r1serve.executor.worker_process" in cmdline and " Z " not in stat:
            pids.append(int(entry.name))
    if ancestor is None:
        return pids
    return [p for p in pids if ancestor in ancestors(p)]


def ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            break
        out.append(pid)
    return out


def test_killed_rank_fails_streams_and_health(checkpoints, tmp_path):
    from server_process import ServerProcess

    server = ServerProcess([str(checkpoints["llama"]), "--served-model-name", "m", "--dtype", "float32",
                            "--max-model-len", "256", "--kv-cache-memory", "0.05", "-tp", "2"], tmp_path / "server.log")
    try:
        [worker] = worker_pids(server.proc.pid)
        body = {"model": "m", "prompt": "Hello", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # the stream is running
            os.kill(worker, signal.SIGKILL)
            t0 = time.monotonic()
            rest = [line for line in lines if line.startswith("data:")]
        assert time.monotonic() - t0 < 15
        assert rest[-1] == "data: [DONE]"
        errors = [json.loads(line[5:]) for line in rest[:-1] if '"error"' in line]
        assert errors and "rank 1" in errors[-1]["error"]["message"]
        health = httpx.get(f"{server.base}/health")
        assert health.status_code == 503 and "rank 1" in health.json()["error"]
        # New requests are refused with an error, not hung.
        refused = httpx.post(f"{server.base}/v1/completions", json={"model": "m", "prompt": "x"}, timeout=30)
        assert refused.status_code == 503 and "error" in refused.json()
    finally:
        server.stop()
    assert worker_pids(server.proc.pid) == [] and server.proc.returncode is not None


def test_stopping_leaves_no_worker_behind(checkpoints, tmp_path):
    # The engine's process killed outright: its workers see their stdin close and leave.
    script = textwrap.dedent(f"""
        from r1serve import LLM
        llm = LLM({str(checkpoints["deepseek_v3"])!r}, dtype="float32", max_model_len=256,
                  kv_cache_memory_gib=0.05, tensor_parallel_size=2, expert_parallel=True)
        print("loaded", flush=True)
        import time; time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "loaded"
        [worker] = worker_pids(proc.pid)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while worker in worker_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker not in worker_pids()
    finally:
        proc.kill()


# ---- sharded loading ----------------------------------------------------------------------------


PEAK_RSS = """
import json, sys
from r1serve import LLM
import r1serve.executor.worker_process, r1serve.executor.worker  # what a worker imports, before the baseline

def peak_kib(pid="self"):  # VmHWM: unlike ru_maxrss, not inherited from the parent across exec
    line = next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:"))
    return int(line.split()[1])

base = peak_kib()
llm = LLM(sys.argv[1], dtype="float32", max_model_len=128, kv_cache_memory_gib=0.01, tensor_parallel_size=int(sys.argv[2]))
ranks = [peak_kib()] + [peak_kib(p.pid) for p in getattr(llm.engine.executor, "procs", [])]
llm.close()
print(json.dumps({"base_kib": base, "ranks_kib": ranks}))
"""


def test_sharded_loading_reads_a_share_per_rank(tmp_path):
    # About 720 MB of float32 weights: well above what a rank holds besides them (its
    # kernels, its cache, the shard's mapped window: about 130 MB here).
    path = make_checkpoint(tmp_path / "big", "llama", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8)

    def measure(tp: int) -> dict:
        done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), str(tp)], capture_output=True, text=True,
                              check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    one, two = measure(1), measure(2)
    whole = one["ranks_kib"][0] - one["base_kib"]
    assert whole > 700_000  # the weights dominate what is measured
    assert len(two["ranks_kib"]) == 2
    for rank, peak in enumerate(two["ranks_kib"]):
        share = (peak - two["base_kib"]) / whole
        assert share <= 0.6, f"rank {rank} grew by {share:.0%} of one rank's load"


# ---- several nodes through Ray ------------------------------------------------------------------


def test_ray_two_nodes(checkpoints, one_rank):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # The head (this process, rank 0) offers no CPUs: rank 1 must be placed on the other node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0)
        with LLM(str(checkpoints["llama"]), **ENGINE, tensor_parallel_size=2,
                 distributed_executor_backend="ray") as llm:
            (_, node0), (_, node1) = llm.engine.executor.nodes
            got = [completion(o.outputs[0]) for o in llm.generate(PROMPTS, params)]
        assert node0 != node1
        assert_same(got, one_rank["llama"])
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_one_tensor_parallel_engine_per_process(checkpoints):
    with LLM(str(checkpoints["llama"]), **ENGINE, tensor_parallel_size=2):
        with pytest.raises(ModelLoadError, match="one per process"):
            LLM(str(checkpoints["llama"]), **ENGINE, tensor_parallel_size=2)
    with LLM(str(checkpoints["llama"]), **ENGINE, tensor_parallel_size=2) as llm:  # closed: a new one may start
        assert llm.generate("Hello", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_killed_replica_under_dp_attention_fails_the_server(checkpoints, tmp_path):
    # The replicas' MoE layers are one group: one dying stops the others' steps too.
    from server_process import ServerProcess

    server = ServerProcess([str(checkpoints["deepseek_v3"]), "--served-model-name", "m", "--dtype", "float32",
                            "--max-model-len", "256", "--kv-cache-memory", "0.05", "-dp", "2", "--expert-parallel"],
                           tmp_path / "server.log")
    try:
        engines = [p for p in children(server.proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(engines) == 2
        body = {"model": "m", "prompt": "Hello", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            for pid in engines:  # whichever runs the stream, the other goes down with it
                os.kill(pid, signal.SIGKILL)
                break
            t0 = time.monotonic()
            rest = [line for line in lines if line.startswith("data:")]
        assert time.monotonic() - t0 < 15 and rest[-1] == "data: [DONE]"
        assert any('"error"' in line for line in rest)
        health = httpx.get(f"{server.base}/health")
        assert health.status_code == 503 and "data-parallel replica" in health.json()["error"]
    finally:
        server.stop()
    assert all(not Path(f"/proc/{p}").exists() or " Z " in Path(f"/proc/{p}/stat").read_text() for p in engines)


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if parent == pid:
                out.append(int(entry.name))
    return out
