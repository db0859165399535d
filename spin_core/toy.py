"""The embedded default (docs/DESIGN.md §6): a dataset, tokenizer and weak SFT model θ0, offline.

`build_toy` makes everything `spin demo` needs on a fresh machine with nothing
downloaded: verifiable instruction pairs (reverse, add, sort, shift letters), a
character-level tokenizer with a chat template, a small Llama, and a short SFT
warm-up. θ0 is deliberately *weak* (about 30% of held-out answers exactly
right), like zephyr-7b-sft-full in the paper: a θ0 trained to convergence writes
the real answers already, leaving SPIN nothing to learn from.

    from spin_core.toy import build_toy
    toy = build_toy("runs/toy")  # ~30 s on 2 CPU cores; cached afterwards
    toy.model_dir, toy.train_path, toy.eval_path
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from spin_core import chat_tasks
from spin_core.config import ToyConfig
from spin_core.logprobs import pad_batch, sequence_logps
from spin_core.loss import sft_loss
from spin_core.prompts import build_example, encode_conversations, prompt_messages
from spin_core.storage.files import atomic_path, write_json_atomic
from spin_core.storage.models import load_model, load_tokenizer, save_model_dir
from spin_core.storage.rundir import ToyArtifacts, toy_artifacts

logger = logging.getLogger(__name__)

TASKS = ("reverse", "add", "sort", "shift")

LETTERS = string.ascii_lowercase
# Difficulty, tuned so that the default warm-up leaves θ0 weak but not hopeless
# (~30% held-out exact match): short words come out right, long ones mostly wrong.
# Reversing and shifting need position-wise copying, which the model is only
# starting to learn after 300 steps, so their words are shorter than sort's.
WORD_LENGTHS = {"reverse": (2, 5), "sort": (3, 9), "shift": (2, 5)}  # (shortest, longest)
MAX_SHIFT = 3
MAX_DIGITS = 2  # per addend

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, USER, ASSISTANT)
# Every message is '<|role|>' + content; only assistant turns end with EOS, as generation does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

MARKER = "toy.json"  # written last: its presence means the build completed


# --------------------------------------------------------------------------- data


def _letters(rng: random.Random, task: str) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(*WORD_LENGTHS[task])))


def _number(rng: random.Random) -> int:
    digits = rng.randint(1, MAX_DIGITS)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _shift(word: str, by: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + by) % len(LETTERS)] for c in word)


def _make_pair(task: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) of `task`; the answer is computed, so it is always right."""
    if task == "reverse":
        word = _letters(rng, task)
        return f"reverse: {word}", word[::-1]
    if task == "add":
        a, b = _number(rng), _number(rng)
        return f"add: {a}+{b}", str(a + b)
    if task == "sort":
        word = _letters(rng, task)
        return f"sort: {word}", "".join(sorted(word))
    if task == "shift":
        word, by = _letters(rng, task), rng.randint(1, MAX_SHIFT)
        return f"shift by {by}: {word}", _shift(word, by)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def make_pairs(n: int, seed: int) -> pd.DataFrame:
    """`n` distinct prompts with their answers, the tasks in equal shares, shuffled.

    Columns: `messages` ([{"role": "user", ...}, {"role": "assistant", ...}]) and
    `task`. The same `seed` gives the same frame.
    """
    return chat_tasks.draw_pairs(
        n,
        seed,
        TASKS,
        _make_pair,
        distinct=lambda task, prompt, answer: prompt,  # a repeat would blur the train/eval split
        max_draws=20 * n + 1000,
        too_few=f"cannot draw {n} distinct toy prompts: the add task has only "
        f"{(10**MAX_DIGITS) ** 2} distinct prompts; ask for fewer pairs",
    )


def task_of(prompt: str) -> str:
    """The task of a toy prompt: its first word ('shift by 2: abc' -> 'shift')."""
    task = prompt.split(maxsplit=1)[0].rstrip(":") if prompt.strip() else ""
    if task not in TASKS:
        raise ValueError(f"not a toy prompt: {prompt!r}; expected one of {TASKS}")
    return task


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write via a temporary name in the same directory, so readers never see half a file."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 4000,
    num_eval: int = 500,
    seed: int = 0,
    chat: bool = False,
) -> tuple[Path, Path]:
    """Write out_dir/train.parquet and out_dir/eval.parquet; no eval prompt is in train.

    `chat`: the natural-language chat tasks of spin_core/chat_tasks.py instead of the
    toy's strings (for a real chat model)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One draw of distinct prompts, split in two, keeps the held-out prompts unseen.
    pairs = (chat_tasks.make_pairs if chat else make_pairs)(num_train + num_eval, seed)
    train_path, eval_path = out_dir / "train.parquet", out_dir / "eval.parquet"
    _write_parquet(pairs.iloc[:num_train].reset_index(drop=True), train_path)
    _write_parquet(pairs.iloc[num_train:].reset_index(drop=True), eval_path)
    return train_path, eval_path


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a chat template, saved to `out_dir`.

    One token per character (printable ASCII plus any character in `texts`), so
    decode(encode(s)) == s for such text, spaces and newlines included.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    # Special tokens are matched first; then every remaining character is its own piece.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # join pieces with no separator
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    # The printable alphabet keeps text outside the toy tasks (a user's prompt) off <unk>.
    tokenizer.train_from_iterator([string.printable, *texts], trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # would rewrite " ." and the like on decode
        model_max_length=1024,
    )
    fast.save_pretrained(out_dir)
    return fast


# -------------------------------------------------------------------------- model


def build_model(
    tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    initializer_range: float = 0.06,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small randomly initialised Llama whose special ids are the tokenizer's.

    `initializer_range` is the std of the initial weights. Llama's 0.02 suits wide
    models; at width 128 it slows the warm-up (5% instead of 13% held-out exact
    match after 300 steps, measured on the full-length tasks).
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    # Seed the initialisation without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    return model


def sft_warmup(
    model,
    tokenizer,
    prompts: list[str],
    responses: list[str],
    *,
    steps: int,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
    max_length: int = 128,
) -> list[float]:
    """Supervised fine-tuning on prompt + response + EOS, the prompt masked out.

    AdamW with a linear warm-up over the first 10% of `steps` to `lr`, then a
    cosine decay to `lr`/10; batches are drawn epoch by epoch in a seeded order.
    Returns the token-averaged loss of each step; leaves the model in eval mode.
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(
            f"need equally many prompts and responses, got {len(prompts)} and {len(responses)}"
        )
    examples = []
    prompt_ids, response_ids = encode_conversations(
        tokenizer, [prompt_messages(p) for p in prompts], responses
    )
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        input_ids, labels, _ = build_example(
            prompt, response, max_length=max_length, max_prompt_length=max_length // 2
        )
        examples.append((input_ids, labels))

    rng = random.Random(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    for step in range(steps):
        if len(order) < batch_size:  # next epoch: a fresh permutation
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = order[:batch_size], order[batch_size:]
        input_ids, attention_mask, labels = pad_batch(
            [examples[i][0] for i in batch],
            [examples[i][1] for i in batch],
            tokenizer.pad_token_id,
        )  # each (batch, seq)
        logps, counts = sequence_logps(model, input_ids, attention_mask, labels)  # (batch,)
        loss = sft_loss(logps, counts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info("sft warm-up step %d/%d loss %.4f", step + 1, steps, losses[-1])
    model.eval()
    return losses


# -------------------------------------------------------------------------- build


def build_from_config(out_dir: str | os.PathLike, spec: ToyConfig) -> ToyArtifacts:
    """`build_toy` with the settings of a config's `toy` section (spin_core.config.ToyConfig)."""
    return build_toy(
        out_dir,
        num_train=spec.num_train,
        num_eval=spec.num_eval,
        sft_steps=spec.sft_steps,
        sft_lr=spec.sft_lr,
        seed=spec.seed,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        sft_batch_size=spec.sft_batch_size,
        base_model=spec.base_model,
    )


def _untrained_theta0(
    base_model: str | None,
    texts: list[str],
    model_dir: Path,
    hidden_size: int,
    num_layers: int,
    seed: int,
):
    """(model, tokenizer) before the SFT warm-up: the chat model `base_model` as it is, or a
    small Llama with a character-level tokenizer trained on `texts` (saved in model_dir)."""
    if base_model is not None:
        return load_model(base_model, dtype=torch.float32), load_tokenizer(base_model)
    tokenizer = train_tokenizer(texts, model_dir)
    model = build_model(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=4 * hidden_size,
        seed=seed,
    )
    return model, tokenizer


def build_toy(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 4000,
    num_eval: int = 500,
    sft_steps: int = 300,
    sft_lr: float = 1e-3,
    sft_batch_size: int = 64,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 4,
    base_model: str | None = None,
    force: bool = False,
) -> ToyArtifacts:
    """Write out_dir/data/{train,eval}.parquet and the weak SFT model out_dir/theta0/.

    With `base_model` (a chat model directory), the data are spin_core/chat_tasks.py's
    natural-language tasks and θ0 is that model after the SFT warm-up, its tokenizer and
    chat template unchanged; otherwise a character-level tokenizer and a small Llama
    (`hidden_size`, `num_layers`) are built for the toy's string tasks.

    A completed build with the same parameters is returned as is (unless `force`).
    Everything is built in a temporary directory and moved into place; the marker
    out_dir/toy.json is written last, so an interrupted build is never mistaken
    for a finished one.
    """
    out_dir = Path(out_dir)
    params = {
        "num_train": num_train,
        "num_eval": num_eval,
        "sft_steps": sft_steps,
        "sft_lr": sft_lr,
        "sft_batch_size": sft_batch_size,
        "seed": seed,
    }
    if (hidden_size, num_layers) != (128, 4):  # a default build keeps its old marker valid
        params |= {"hidden_size": hidden_size, "num_layers": num_layers}
    if base_model is not None:
        params["base_model"] = str(base_model)
    return _build(out_dir, params, base_model, force)


def _build(out_dir: Path, params: dict, base_model: str | None, force: bool) -> ToyArtifacts:
    """`build_toy` with its parameters as recorded in the marker."""
    num_train, num_eval, seed = params["num_train"], params["num_eval"], params["seed"]
    hidden_size, num_layers = params.get("hidden_size", 128), params.get("num_layers", 4)
    artifacts = toy_artifacts(out_dir)
    marker = out_dir / MARKER
    if not force and marker.exists() and artifacts.model_dir.is_dir():
        if json.loads(marker.read_text()).get("params") == params:
            logger.info("toy model already built in %s", out_dir)
            return artifacts
        logger.info("toy in %s was built with other parameters; rebuilding", out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".toy-build-") as tmp:
        staged = toy_artifacts(Path(tmp))
        logger.info("writing %d train and %d eval pairs", num_train, num_eval)
        write_dataset(
            staged.data_dir,
            num_train=num_train,
            num_eval=num_eval,
            seed=seed,
            chat=base_model is not None,
        )
        train = pd.read_parquet(staged.train_path)
        prompts = [messages[0]["content"] for messages in train["messages"]]
        responses = [messages[1]["content"] for messages in train["messages"]]

        model, tokenizer = _untrained_theta0(
            base_model, prompts + responses, staged.model_dir, hidden_size, num_layers, seed
        )
        logger.info(
            "θ0 before warm-up: a %.2fM-parameter %s, vocabulary %d",
            model.num_parameters() / 1e6,
            type(model).__name__,
            len(tokenizer),
        )
        losses = sft_warmup(
            model,
            tokenizer,
            prompts,
            responses,
            steps=params["sft_steps"],
            lr=params["sft_lr"],
            batch_size=params["sft_batch_size"],
            seed=seed,
        )
        if base_model is None:
            model.save_pretrained(staged.model_dir)
        else:
            save_model_dir(model, tokenizer, staged.model_dir)

        # The old build goes first (marker before contents), then the new one moves in.
        marker.unlink(missing_ok=True)
        for old in (artifacts.data_dir, artifacts.model_dir):
            if old.exists():
                shutil.rmtree(old)
        os.replace(staged.data_dir, artifacts.data_dir)
        os.replace(staged.model_dir, artifacts.model_dir)

    summary = {
        "params": params,
        "final_sft_loss": losses[-1] if losses else None,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    write_json_atomic(summary, marker)
    logger.info("built the toy in %s in %.0f s", out_dir, summary["build_seconds"])
    return artifacts


def task_grouping(heldout: pd.DataFrame) -> Callable[[str], str] | None:
    """The task of each held-out prompt when they are the embedded default's toy or chat
    tasks (a per-task breakdown), else None."""
    for candidate in (task_of, chat_tasks.task_of):
        try:
            heldout["prompt"].map(candidate)
        except ValueError:
            continue
        return candidate
    return None
