"""The real-tokenizer tier: Mistral-7B's SentencePiece tokenizer, zephyr's template, a tiny Mistral.

The toy's character-level tokenizer cannot show the bugs that matter on real
models (a response encoded on its own gets `▁Le` for `Le` and no BOS; a
decoded-and-re-encoded generation is not what the opponent produced). These
tests run the library and one pipeline iteration on tests/realtok.py's build.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from prefect.testing.utilities import prefect_test_harness

from spin_core.config import ModelConfig, load_config
from spin_core.generation import Decoding, HFBackend, generate_shards
from spin_core.prompts import encode_conversation, encode_pairs, prompt_messages
from spin_core.storage.models import load_policy, load_tokenizer
from spin_core.storage.rundir import RunDir
from tests.naive import teacher_forced_logp
from tests.overrides import overrides

STARTS = {
    "letter": "Leaves fall in autumn.",
    "space": " leading space, kept",
    "digit": "42 is the answer.",
    "newline": "\nFirst line after a newline.",
    "punctuation": "...and then it rained!",
}


@pytest.mark.parametrize("start", sorted(STARTS))
def test_prompt_and_response_ids_are_the_one_pass_tokenization(mistral_build, start):
    tokenizer = load_tokenizer(str(mistral_build.model_dir))
    messages = prompt_messages("Tell me about the seasons.")
    prompt_ids, response_ids = encode_conversation(tokenizer, messages, STARTS[start])
    whole = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": STARTS[start]}], tokenize=False
    )
    one_pass = tokenizer(whole)["input_ids"]  # BOS as the tokenizer adds it
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(1) == 1
    assert prompt_ids + response_ids == one_pass[: len(prompt_ids) + len(response_ids)]
    assert response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in response_ids[:-1]
    # What follows the EOS in the rendered chat (zephyr's '\n') is not part of y.
    assert len(one_pass) - len(prompt_ids) - len(response_ids) == 2
    if start == "letter":
        first = tokenizer.convert_ids_to_tokens(response_ids[:1])[0]
        alone = tokenizer.convert_ids_to_tokens(tokenizer(STARTS[start])["input_ids"])[1]
        assert (first, alone) == ("Le", "▁Le")  # the bug class a separate encoding has


def test_multi_turn_context_is_rendered_before_the_last_prompt(mistral_build):
    tokenizer = load_tokenizer(str(mistral_build.model_dir))
    context = json.dumps(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    )
    messages = prompt_messages("And now?", context)
    prompt_ids, response_ids = encode_conversation(tokenizer, messages, "Now this.")
    text = tokenizer.decode(prompt_ids)
    assert text.index("Hi") < text.index("Hello!") < text.index("And now?")
    assert tokenizer.decode(response_ids, skip_special_tokens=True) == "Now this."


@pytest.fixture(scope="module")
def opponent(mistral_build):
    return load_policy(str(mistral_build.model_dir), ModelConfig(precision="fp32"))


def test_generated_ids_are_kept_for_stopped_and_cut_responses(opponent, mistral_build, tmp_path):
    """The ids stored for y' are the ids generated; a cut response has no EOS appended."""
    model, tokenizer = opponent
    chats = pd.read_parquet(mistral_build.dataset).head(12)
    frame = pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(len(chats))],
            "prompt": chats["messages"].map(lambda m: m[0]["content"]),
            "real": chats["messages"].map(lambda m: m[1]["content"]),
        }
    )
    frame["prompt_ids"], frame["real_ids"] = encode_pairs(tokenizer, frame, 256)
    # Sampling from a random model: some rows hit EOS early, the others are cut at 6 tokens.
    decoding = Decoding(True, 3.0, 1.0, 6, 0, "chat")
    backend = HFBackend(model, tokenizer, decoding, batch_tokens=4096, max_batch_size=16)
    eos_bias = torch.zeros(model.config.vocab_size)
    # p(EOS) ≈ 0.2 a token at T = 3 over 32k tokens: rows that stop and rows cut at 6 tokens.
    eos_bias[tokenizer.eos_token_id] = 27.0
    model.lm_head.bias = torch.nn.Parameter(eos_bias)
    try:
        paths = generate_shards(
            backend,
            frame,
            tmp_path,
            shard_size=6,
            opponent="θ0",
            decoding=decoding,
        )
    finally:
        model.lm_head.bias = None
    shards = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    reasons = set(shards["finish_reason"])
    assert reasons == {"stop", "length"}
    for ids, reason, text in zip(
        shards["generated_ids"], shards["finish_reason"], shards["generated"], strict=True
    ):
        ids = list(ids)
        assert (ids[-1] == tokenizer.eos_token_id) == (reason == "stop")
        if reason == "length":
            assert len(ids) == 6
        # Decoding loses information (a leading space, merges): the ids are what counts.
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_sampled_negatives_differ_across_prompts_and_workers(opponent, mistral_build, tmp_path):
    """The same prompt in two shards (two workers' seeds) is not answered by one repeated sample."""
    model, tokenizer = opponent
    prompt = encode_pairs(
        tokenizer, pd.DataFrame({"prompt": ["Say something."], "real": ["Something."]}), 256
    )[0][0]
    frame = pd.DataFrame({"id": ["a", "b", "c", "d"], "prompt": "x", "real": "y"})
    frame["prompt_ids"] = [prompt] * 4
    decoding = Decoding(True, 1.0, 1.0, 8, 0, "chat")
    backend = HFBackend(model, tokenizer, decoding, batch_tokens=4096, max_batch_size=4)
    paths = generate_shards(
        backend,
        frame,
        tmp_path,
        shard_size=1,
        opponent="θ0",
        decoding=decoding,
    )
    samples = [tuple(pd.read_parquet(p)["generated_ids"].iloc[0]) for p in paths]
    assert len(set(samples)) == 4


@pytest.fixture(scope="module")
def one_iteration(mistral_build, tmp_path_factory):
    from flows.pipeline import spin_pipeline

    cfg = load_config(
        "configs/demo.yaml",
        overrides(
            mistral_build,
            {
                "data.prompt_turns": "all",
                "run.iterations": 1,
                "run.baseline": "none",
                "training.max_length": 256,
                "training.max_prompt_length": 160,
                "generation.max_new_tokens": 12,
                "generation.shard_size": 16,
                "generation.do_sample": True,
            },
        ),
    )
    run_dir = tmp_path_factory.mktemp("realtok-run") / "run"
    with prefect_test_harness():
        spin_pipeline(cfg, str(run_dir))
    return RunDir(run_dir), cfg


@pytest.mark.slow
def test_pipeline_scores_exactly_the_stored_ids(one_iteration, mistral_build):
    """One iteration on the real tokenizer: θ0's stored log-probs = a naive teacher-forced sum."""
    run, cfg = one_iteration
    generated = pd.read_parquet(run.generated(0))
    assert set(generated["finish_reason"]) >= {"length"}  # some responses were cut
    train = pd.read_parquet(run.train(0))
    assert len(train) > 0
    model = load_policy(str(mistral_build.model_dir), cfg.model)[0]
    for _, row in train.head(12).iterrows():
        prompt = list(row["prompt_ids"])
        for column, logps in (
            ("real_ids", "opponent_real_logps"),
            ("generated_ids", "opponent_generated_logps"),
        ):
            naive = teacher_forced_logp(model, prompt, list(row[column]))
            assert row[logps] == pytest.approx(naive, abs=1e-3)
        assert row["prompt_ids"][0] == 1  # BOS, as the SFT model saw it
    stopped = generated["finish_reason"] == "stop"
    last = generated["generated_ids"].map(lambda ids: ids[-1])
    assert (last[stopped] == 2).all() and (last[~stopped] != 2).all()
    prompts = pd.read_parquet(run.prompts(0))
    assert "context" in prompts and (prompts["context"] != "[]").any()  # multi-turn prompts
    assert np.isfinite(json.loads(run.iteration_metrics(0).read_text())["real_loglik_per_token"])


def test_a_template_that_merges_prompt_and_response_tokens_is_refused(mistral_build):
    """Without a chat template, the plain template's trailing space merges into '▁Le': refused."""
    from spin_core.errors import InputError

    tokenizer = load_tokenizer(str(mistral_build.model_dir))
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="not a prefix") as error:
        encode_conversation(tokenizer, prompt_messages("Tell me."), "Leaves fall.")
    assert "\n" not in str(error.value)
