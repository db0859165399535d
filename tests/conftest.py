"""Shared fixtures: one small embedded-default build for the whole session."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A test runner started in the background by a script without job control (`make test &`,
# some CI runners) has SIGINT and SIGQUIT ignored, and every process a test starts would
# inherit that: a test's Ctrl-C would reach nothing, and a `prefect worker`, which turns
# SIGTERM into SIGINT to itself, would never exit. A handler, unlike "ignored", is reset
# when a child execs: the tests' processes get these signals as from a terminal.
for _signum, _handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGQUIT, None)):
    if signal.getsignal(_signum) is signal.SIG_IGN:
        signal.signal(_signum, _handler or (lambda signum, frame: None))

SMALL_TOY = ["toy.num_train=600", "toy.num_eval=60", "toy.sft_steps=60", "toy.sft_lr=2e-3"]


@pytest.fixture(scope="session")
def toy_build(tmp_path_factory):
    from spin_core import toy

    return toy.build_toy(
        tmp_path_factory.mktemp("toy"),
        num_train=600,
        num_eval=60,
        sft_steps=60,
        sft_lr=2e-3,
        seed=0,
    )


@pytest.fixture(scope="session")
def mistral_build(tmp_path_factory):
    """Mistral-7B's real tokenizer (zephyr's template), a tiny MistralForCausalLM and chat data.

    See tests/realtok.py; needs the `test` extra's mistral-common, sentencepiece, protobuf.
    """
    from tests.realtok import build_realtok

    return build_realtok(tmp_path_factory.mktemp("realtok"), seed=0)


@pytest.fixture
def toy_config(toy_build):
    """A small config on the session's toy model and data."""
    from spin_core.config import load_config
    from tests.overrides import overrides

    changes = {
        "data.num_prompts": 64,
        "data.eval_size": 40,
        "training.save_steps": 4,
        "generation.shard_size": 32,
    }
    return load_config("configs/demo.yaml", overrides(toy_build, changes))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF directory: `make setup`'s import when it is of the
    installed wheel's file, else imported once for this session (~35 s)."""
    from spin_core.storage.gguf_import import (
        SMOLLM2_DIR,
        import_gguf,
        imported_from,
        sha256,
        smollm2_gguf,
    )

    gguf = smollm2_gguf()
    made = Path(__file__).resolve().parent.parent / SMOLLM2_DIR
    done = imported_from(made)
    if done is not None and done["sha256"] == sha256(gguf):
        return made
    return import_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "model")
