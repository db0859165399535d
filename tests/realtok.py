"""A real-tokenizer test tier: Mistral-7B v0.1's SentencePiece tokenizer, offline.

The toy build (spin_core.toy) tokenizes character by character, which hides every
way a real tokenizer can bite: '▁' word prefixes, byte fallback for newlines and
emoji, merges across the prompt/response boundary, tokens after special tokens.
`build_realtok` makes the same kind of artifacts from the tokenizer that
zephyr-7b-sft-full (SPIN's θ0) uses, taken from the `mistral-common` wheel
(`mistral_common/data/tokenizer.model.v1`, byte-identical to the hub's
Mistral-7B-v0.1 `tokenizer.model`), with nothing downloaded:

- `model_dir`: that tokenizer converted to the hub's fast-tokenizer files (tokenizer.json
  as LlamaConverter writes it for `legacy: true`, BOS added, no EOS, no pad token,
  zephyr's chat template) next to a tiny random MistralForCausalLM with the real
  32000-token vocabulary. transformers 5's AutoTokenizer loads a model_type "mistral"
  directory like this one (and the hub's) as the generic `TokenizersBackend`, which
  uses tokenizer.json exactly as written;
- `dataset` / `eval_dataset`: UltraChat-shaped Parquet (`messages` only), single- and
  multi-turn, with responses that start with a letter, a space, a digit, a newline
  or punctuation, and that carry accents and emoji.

    from tests.realtok import build_realtok
    rt = build_realtok(tmp_dir)
    load_config("configs/demo.yaml", rt.config_overrides())
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

# Exactly the chat template of HuggingFaceH4/zephyr-7b-sft-full on the hub.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# sha256 of mistralai/Mistral-7B-v0.1's tokenizer.model (also Mixtral's, zephyr's).
SENTENCEPIECE_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
VOCAB_SIZE = 32000
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
# '<|assistant|>' is not a special token: it is split into pieces. After '</s>' the
# legacy tokenizer starts the next chunk with '▁' (28705), then '\n' is a byte (13);
# '<' there is 28789, not '▁<' (523) as when "<|assistant|>\n" is encoded alone.
ASSISTANT_PREFIX_IDS_IN_CONTEXT = (28789, 28766, 489, 11143, 28766, 28767, 13)
ASSISTANT_PREFIX_IDS_ALONE = (523, 28766, 489, 11143, 28766, 28767, 13)
AFTER_EOS_IDS = (28705, 13)  # the '▁' + '\n' that follow every '</s>' in a rendered chat

MODEL_DIMS: dict[str, Any] = {
    # Mistral's shape in miniature: grouped-query attention (4 query heads share 2 kv
    # heads), sliding window, untied lm_head. The real vocabulary makes the embedding and
    # lm_head the bulk of the weights (2 x 32000 x 32 float32 = 8 MiB), so hidden is small.
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 64,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
}
MODEL_MAX_LENGTH = 2048  # zephyr-7b-sft-full's tokenizer_config (alignment-handbook's cap)

NUM_TRAIN, NUM_EVAL = 120, 40
MARKER = "realtok.json"  # written last: its presence means the build completed


def sentencepiece_model_path() -> Path:
    """Where the installed mistral-common wheel keeps Mistral's v1 SentencePiece model."""
    spec = importlib.util.find_spec("mistral_common")  # no import: only its data is needed
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "mistral-common is not installed; it ships Mistral-7B's tokenizer: "
            "pip install -e '.[test]'"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "tokenizer.model.v1"
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != SENTENCEPIECE_SHA256:
                raise ValueError(f"{path} is not Mistral-7B-v0.1's tokenizer (sha256 {digest})")
            return path
    raise FileNotFoundError(f"mistral_common/data/tokenizer.model.v1 not found under {spec}")


@dataclass
class RealTokArtifacts:
    """What `build_realtok` made: θ0's directory, the data, and the loaded tokenizer."""

    model_dir: Path
    dataset: Path
    eval_dataset: Path
    tokenizer: Any  # AutoTokenizer.from_pretrained(model_dir): a fast TokenizersBackend

    def config_overrides(self) -> list[str]:
        """`--set` overrides that point a config at this build's data and θ0."""
        return [
            f"data.dataset={self.dataset}",
            f"data.eval_dataset={self.eval_dataset}",
            f"model.name_or_path={self.model_dir}",
        ]


# ---------------------------------------------------------------------- tokenizer


def _special(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


# The hub's tokenizer_config.json of mistralai/Mistral-7B-v0.1, with zephyr-7b-sft-full's
# chat template and length cap; pad_token left unset, as Mistral's is.
TOKENIZER_CONFIG: dict[str, Any] = {
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {
        str(UNK_ID): _special("<unk>"),
        str(BOS_ID): _special("<s>"),
        str(EOS_ID): _special("</s>"),
    },
    "additional_special_tokens": [],
    "bos_token": "<s>",
    "chat_template": ZEPHYR_CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": True,
    "model_max_length": MODEL_MAX_LENGTH,
    "pad_token": None,
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
}


def save_tokenizer(out_dir: Path) -> None:
    """Convert the SentencePiece model into the hub's Mistral-7B-v0.1 tokenizer files.

    tokenizer.json as transformers' LlamaConverter writes it for a `legacy` tokenizer
    (what the hub's file is): BPE with byte fallback, the normalizer prepending '▁' to
    every chunk between special tokens and turning spaces into '▁', no pre-tokenizer,
    BOS added by the post-processor. tokenizer_config.json and tokenizer.model as on
    the hub. A model_type "mistral" directory loads it with AutoTokenizer as the
    generic fast backend, which uses tokenizer.json as written.
    """
    from tokenizers import normalizers
    from transformers import LlamaTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sentencepiece_model_path(), out_dir / "tokenizer.model")
    # transformers 5 converts the `tokenizer.model` of a directory (sentencepiece and
    # protobuf read the proto): vocabulary and merges ranked by piece score.
    converted = LlamaTokenizer.from_pretrained(str(out_dir), legacy=True, add_bos_token=True)
    backend = converted.backend_tokenizer
    if backend.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"converted vocabulary has {backend.get_vocab_size()} tokens")
    # LlamaTokenizer (transformers 5) rebuilds a Metaspace pre-tokenizer, which adds no
    # '▁' before text that already starts with a space; the hub's legacy file does.
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(prepend="▁"), normalizers.Replace(pattern=" ", content="▁")]
    )
    backend.pre_tokenizer = None
    backend.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# -------------------------------------------------------------------------- model


def save_model(out_dir: Path, *, seed: int = 0) -> None:
    """A random-initialised MistralForCausalLM over the real vocabulary, float32 safetensors."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        **MODEL_DIMS,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)


# --------------------------------------------------------------------------- data

WORDS = (
    "river mountain garden lantern window market teacher signal orbit harbor recipe "
    "puzzle engine meadow violin pencil planet ocean castle forest bridge candle "
    "library rocket winter summer coffee travel history science music design"
).split()
VERBS = "explain describe compare summarize list suggest outline imagine".split()
OPENERS = (
    "Sure, here is a short answer.",
    "Certainly.",
    "Here are some thoughts.",
    "Good question!",
)
# How a response starts (or what it carries); each row gets one, in turn.
STYLES = ("letter", "space", "digit", "newline", "punct", "unicode", "emoji", "mixed")
UNICODE_BITS = ("café", "naïve", "jalapeño", "Zürich", "résumé", "façade", "über")
EMOJI = ("🙂", "🚀", "🌲", "☕", "🎉")


def sentence(rng: random.Random, lo: int = 4, hi: int = 10) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + rng.choice(".!.")


def question(rng: random.Random) -> str:
    topic = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
    tail = sentence(rng, 3, 7) if rng.random() < 0.5 else ""
    return f"{rng.choice(VERBS).capitalize()} the {topic}? {tail}".strip()


def _response(rng: random.Random, style: str) -> str:
    body = " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
    if style == "letter":
        return f"{rng.choice(OPENERS)} {body}"
    if style == "space":
        return f" {body}"
    if style == "digit":
        n = rng.randint(2, 9)
        return f"{n} points: {body}"
    if style == "newline":
        return f"\n{body}"
    if style == "punct":
        return rng.choice(('"', "(", "...", "- ", "*", "!")) + body
    if style == "unicode":
        return f"{body} The {rng.choice(UNICODE_BITS)} near the {rng.choice(WORDS)} — worth it."
    if style == "emoji":
        return f"{rng.choice(EMOJI)} {body} {rng.choice(EMOJI)}"
    # mixed: lines, a numbered list, a double space, a tab and an accent
    first, second = sentence(rng, 2, 5), sentence(rng, 2, 5)
    return f"{body}\n\n1. {first}\n2.  {second}\n\tEnjoy the café {rng.choice(EMOJI)}"


def make_chats(n: int, seed: int) -> pd.DataFrame:
    """`n` UltraChat-shaped rows (a `messages` column), every user turn distinct.

    Every fourth chat has two exchanges (user, assistant, user, assistant); the
    response styles of STYLES come in turn, so each appears in any 8 rows.
    """
    rng = random.Random(seed)
    seen: set[str] = set()

    def fresh_question() -> str:
        while True:
            asked = question(rng)
            if asked not in seen:
                seen.add(asked)
                return asked

    rows = []
    for i in range(n):
        turns = 2 if i % 4 == 3 else 1
        messages = []
        for turn in range(turns):
            style = STYLES[(i + turn * 3) % len(STYLES)]
            messages.append({"role": "user", "content": fresh_question()})
            messages.append({"role": "assistant", "content": _response(rng, style)})
        rows.append({"messages": messages})
    return pd.DataFrame(rows, columns=["messages"])


def write_datasets(
    out_dir: Path, *, num_train: int = NUM_TRAIN, num_eval: int = NUM_EVAL, seed: int = 0
) -> tuple[Path, Path]:
    """train.parquet and eval.parquet under out_dir; no eval prompt appears in train."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chats = make_chats(num_train + num_eval, seed)  # one draw: user turns distinct across both
    train, held_out = out_dir / "train.parquet", out_dir / "eval.parquet"
    chats.iloc[:num_train].reset_index(drop=True).to_parquet(train, index=False)
    chats.iloc[num_train:].reset_index(drop=True).to_parquet(held_out, index=False)
    return train, held_out


# -------------------------------------------------------------------------- build


def build_realtok(out_dir: str | Path, *, seed: int = 0) -> RealTokArtifacts:
    """Make (or reuse, when complete) the real-tokenizer θ0 and data under out_dir."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    model_dir, data_dir = out_dir / "theta0", out_dir / "data"
    marker = out_dir / MARKER
    if not marker.is_file():
        save_tokenizer(model_dir)
        save_model(model_dir, seed=seed)
        write_datasets(data_dir, seed=seed)
        marker.write_text(json.dumps({"seed": seed, "source": str(sentencepiece_model_path())}))
    return RealTokArtifacts(
        model_dir=model_dir,
        dataset=data_dir / "train.parquet",
        eval_dataset=data_dir / "eval.parquet",
        tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
    )
