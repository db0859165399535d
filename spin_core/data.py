"""SFT data in, SPIN training sets out: loading and sampling.

Steps 1 and 3 of SPIN (Chen et al., 2024) live here: `sample_prompts` draws the
seeded (prompt, real) sample that every iteration reuses, and `build_training_set`
joins the opponent's generations of the current iteration with those of its
`history` predecessors into D_t = {(x, y_real, y_generated)}.

`load_pairs` reads UltraChat-style chat data (a `messages` list of {role, content})
or two plain columns with pyarrow kernels, so 200k multi-turn rows load in seconds.
The run directory's Parquet files are written and read by spin_core/storage/files.py.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from spin_core.config import DataConfig
from spin_core.errors import InputError, first_line

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ["id", "prompt", "real"]
# `context` (JSON of the turns before the last user turn) only with data.prompt_turns: all.
OPTIONAL_COLUMNS = ["context"]
# prompts.parquet: the pairs with the token ids every later step uses (spin_core.prompts).
SAMPLE_COLUMNS = [*PAIR_COLUMNS, *OPTIONAL_COLUMNS, "prompt_ids", "real_ids"]
TRAINING_COLUMNS = [
    "id",
    "prompt",
    "real",
    "generated",
    "prompt_ids",
    "real_ids",
    "generated_ids",
    "source_iteration",
]
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
PARQUET_BATCH_ROWS = 8192  # rows decoded at once: bounds memory to a batch of chats

# Independent random streams per use of `data.seed`, so the held-out split and
# the prompt sample are not correlated draws.
_HELDOUT_STREAM = 1
_SAMPLE_STREAM = 2
_EVAL_SUBSET_STREAM = 3


def pair_id(prompt: str, response: str) -> str:
    """Stable id of a (prompt, response) pair: 16 hex digits of blake2b."""
    data = prompt.encode("utf-8") + b"\x00" + response.encode("utf-8")
    return hashlib.blake2b(data, digest_size=8).hexdigest()


# ---------------------------------------------------------------------- loading


@dataclass
class LoadStats:
    """What `load_pairs` read and dropped from one source."""

    source: str
    rows: int
    dropped_empty: int
    dropped_duplicates: int

    @property
    def rows_read(self) -> int:
        return self.rows + self.dropped_empty + self.dropped_duplicates

    def as_dict(self) -> dict:
        return asdict(self) | {"rows_read": self.rows_read}


def load_pairs(
    source: str,
    *,
    split: str = "train",
    messages_column: str = "messages",
    prompt_column: str | None = None,
    response_column: str | None = None,
    prompt_turns: str = "first",
    revision: str | None = None,
) -> tuple[pd.DataFrame, LoadStats]:
    """(prompt, real) pairs of a dataset, in source order, with columns id, prompt, real.

    `source` is a .parquet / .jsonl / .json file, a directory of them (every such
    file, sorted by name), or else a Hugging Face dataset name loaded with
    `datasets.load_dataset(source, split=split, revision=revision)`.

    With `prompt_column` and `response_column` those two columns are used;
    otherwise `messages_column` holds chats in UltraChat format: the first user
    message is the prompt, the first assistant message after it the real response
    (`prompt_turns="first"`, the paper's choice), or (`prompt_turns="all"`) the last
    assistant message is the real response, the user turn before it the prompt, and
    every earlier turn goes, as JSON, into a `context` column.
    Pairs with an empty (or whitespace-only) prompt or response, or without a
    user turn answered by an assistant turn, are dropped and counted; so are exact
    duplicate pairs (same id). Raises `InputError` naming the file and what was
    expected when the source is missing or unreadable, lacks a column, or has no
    usable rows.
    """
    if (prompt_column is None) != (response_column is None):
        raise InputError(
            "data.prompt_column and data.response_column must be set together "
            f"(got {prompt_column!r} and {response_column!r})"
        )
    texts = _read_texts(
        source, split, revision, messages_column, prompt_column, response_column, prompt_turns
    )
    rows_read = texts.rows_read
    dropped_empty = rows_read - len(texts.prompts)
    pa.default_memory_pool().release_unused()  # the decoded chats' buffers
    pairs = _pairs_frame(texts)
    del texts
    duplicated = pairs["id"].duplicated(keep="first")
    if duplicated.any():
        pairs = pairs[~duplicated].reset_index(drop=True)
    stats = LoadStats(
        source=str(source),
        rows=len(pairs),
        dropped_empty=dropped_empty,
        dropped_duplicates=int(duplicated.sum()),
    )
    if pairs.empty:
        expected = (
            f"non-empty '{prompt_column}' and '{response_column}' values"
            if prompt_column
            else f"a '{messages_column}' chat with a user turn answered by an assistant turn"
        )
        raise InputError(
            f"{source}: no usable rows (read {rows_read}: {dropped_empty} empty or without "
            f"a user/assistant exchange); expected rows with {expected}"
        )
    if dropped_empty or stats.dropped_duplicates:
        logger.info(
            "%s: %d pairs (dropped %d empty, %d duplicates)",
            source,
            stats.rows,
            dropped_empty,
            stats.dropped_duplicates,
        )
    pairs.attrs["source"] = str(source)
    return pairs, stats


@dataclass
class _Texts:
    prompts: list[str] = field(default_factory=list)
    reals: list[str] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)  # prompt_turns "all": earlier turns
    rows_read: int = 0


def _read_texts(
    source: str,
    split: str,
    revision: str | None,
    messages_column: str,
    prompt_column: str | None,
    response_column: str | None,
    prompt_turns: str,
) -> _Texts:
    """The usable (prompt, real[, context]) strings of a source, and the rows read."""
    columns = [prompt_column, response_column] if prompt_column else [messages_column]
    texts = _Texts()
    for where, batches in _read_source(source, split, columns, revision):
        # One batch of chats at a time, keeping only the first exchange as Python strings,
        # so the chats' full text (GBs for UltraChat) is never in memory at once.
        for table in batches:
            if prompt_column:
                prompt = _string_column(table, prompt_column, where)
                real = _string_column(table, response_column, where)
            elif prompt_turns == "all":
                prompt, real, context = _last_exchange(
                    table.column(messages_column), messages_column, where
                )
            else:
                prompt, real = _first_exchange(
                    table.column(messages_column), messages_column, where
                )
            texts.rows_read += len(prompt)
            usable = pc.and_(_non_blank(prompt), _non_blank(real))
            texts.prompts += prompt.filter(usable).to_pylist()
            texts.reals += real.filter(usable).to_pylist()
            if prompt_turns == "all" and not prompt_column:
                texts.contexts += context.filter(usable).to_pylist()
    return texts


def _pairs_frame(texts: _Texts) -> pd.DataFrame:
    """id, prompt, real (and context) as object columns, not pandas 3's Arrow-backed
    strings: the row filters that follow (held-out split, overlap, sample) then copy
    pointers, not every prompt and response."""
    prompts, reals, contexts = texts.prompts, texts.reals, texts.contexts
    keyed = [c + p for c, p in zip(contexts, prompts, strict=True)] if contexts else prompts
    pairs = pd.DataFrame(
        {
            "id": pd.Series(
                [pair_id(p, r) for p, r in zip(keyed, reals, strict=True)], dtype=object
            ),
            "prompt": pd.Series(prompts, dtype=object),
            "real": pd.Series(reals, dtype=object),
        }
    )
    if contexts:
        pairs["context"] = pd.Series(contexts, dtype=object)
    return pairs


def _read_source(
    source: str, split: str, columns: list[str], revision: str | None = None
) -> list[tuple[str, Iterable[pa.Table]]]:
    """(name, tables) per file of `source`: its rows in batches, each holding `columns`."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise InputError(
                f"{source}: directory has no {', '.join(DATA_SUFFIXES)} files; "
                "expected a dataset file, a directory of them or a Hugging Face dataset name"
            )
        return [(str(f), _read_file(f, columns)) for f in files]
    if path.is_file():
        return [(str(path), _read_file(path, columns))]
    if path.suffix in DATA_SUFFIXES or source.startswith(("/", ".", "~")):
        raise InputError(f"{source}: file not found")
    return [(source, [_read_hub(source, split, columns, revision)])]


def _read_file(path: Path, columns: list[str]) -> Iterable[pa.Table]:
    if path.suffix == ".parquet":
        try:
            # Without pre-buffering: it would hold every row group's compressed bytes at once.
            parquet = pq.ParquetFile(path, pre_buffer=False)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
        _check_columns(path, parquet.schema_arrow.names, columns)
        return _parquet_batches(path, parquet, columns)
    if path.suffix in (".jsonl", ".json"):
        table = _read_json(path)
        _check_columns(path, table.column_names, columns)
        return [table.select(columns)]
    raise InputError(f"{path}: unsupported file type; expected one of {', '.join(DATA_SUFFIXES)}")


def _parquet_batches(path: Path, parquet: pq.ParquetFile, columns: list[str]) -> Iterator[pa.Table]:
    """`columns` of a Parquet file, PARQUET_BATCH_ROWS rows at a time."""
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            yield pa.Table.from_batches([batch])
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None


def _read_json(path: Path) -> pa.Table:
    try:
        return pajson.read_json(path)
    except (OSError, pa.ArrowException) as arrow_error:
        # pyarrow reads JSON Lines only and infers types from the first block;
        # pandas also reads a JSON array of records and mixed-type lines.
        try:
            frame = pd.read_json(path, lines=path.suffix == ".jsonl")
            return pa.Table.from_pandas(frame, preserve_index=False)
        except (ValueError, pa.ArrowException):
            raise InputError(
                f"{path}: not readable JSON Lines records ({first_line(arrow_error)})"
            ) from None


def _read_hub(source: str, split: str, columns: list[str], revision: str | None) -> pa.Table:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors all mean "cannot load"
        raise InputError(
            f"{source}: not a local file or directory, and loading it as a Hugging Face "
            f"dataset (split {split!r}) failed: {first_line(exc)}"
        ) from None
    _check_columns(source, dataset.column_names, columns)
    return dataset.select_columns(columns).with_format("arrow")[:]


def _check_columns(where: str | Path, found: list[str], columns: list[str]) -> None:
    for column in columns:
        if column not in found:
            hint = (
                ""
                if len(columns) == 2
                else "; set data.messages_column, or data.prompt_column and data.response_column"
            )
            raise InputError(
                f"{where}: no column '{column}' (found: {', '.join(map(repr, found)) or 'none'})"
                + hint
            )


def _string_column(table: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    column = table.column(name)
    if pa.types.is_large_string(column.type):
        return column
    if pa.types.is_string(column.type) or pa.types.is_null(column.type):
        return column.cast(pa.large_string())
    raise InputError(f"{where}: column '{name}' must hold text, got {column.type}")


def _first_exchange(
    messages: pa.ChunkedArray, name: str, where: str
) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """Per chat: the first user message and the first assistant message after it.

    Missing turns come back as null. Works chunk by chunk on flattened arrays, so
    it never loops over rows in Python nor concatenates past 2 GiB of text.
    """
    expected = f"column '{name}' must hold lists of {{role, content}} messages"
    kind = messages.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise InputError(f"{where}: {expected}, got {kind}")
    message = kind.value_type
    if not pa.types.is_struct(message) or {"role", "content"} - {
        message.field(i).name for i in range(message.num_fields)
    }:
        raise InputError(f"{where}: {expected}, got {kind}")
    content_type = message.field("content").type
    if not (
        pa.types.is_string(content_type)
        or pa.types.is_large_string(content_type)
        or pa.types.is_null(content_type)
    ):
        raise InputError(f"{where}: {expected} with text content, got content of {content_type}")

    prompts, reals = [], []
    for chats in messages.chunks:
        flat = pc.list_flatten(chats)  # (messages,), skipping null chats
        lengths = pc.fill_null(pc.list_value_length(chats), 0).to_numpy()
        chat_of = np.repeat(np.arange(len(chats)), lengths)  # (messages,) -> chat index
        role = pc.struct_field(flat, "role")
        content = pc.struct_field(flat, "content")  # cast after the take: 2 of ~7 messages
        position = np.arange(len(flat))

        is_user = pc.fill_null(pc.equal(role, "user"), False).to_numpy(zero_copy_only=False)
        first_user = _first_per_chat(position[is_user], chat_of[is_user], len(chats))

        after_user = (first_user[chat_of] >= 0) & (position > first_user[chat_of])
        is_assistant = pc.fill_null(pc.equal(role, "assistant"), False).to_numpy(
            zero_copy_only=False
        )
        answer = is_assistant & after_user
        first_answer = _first_per_chat(position[answer], chat_of[answer], len(chats))

        prompts.append(
            content.take(pa.array(first_user, mask=first_user < 0)).cast(pa.large_string())
        )
        reals.append(
            content.take(pa.array(first_answer, mask=first_answer < 0)).cast(pa.large_string())
        )
    return (
        pa.chunked_array(prompts, type=pa.large_string()),
        pa.chunked_array(reals, type=pa.large_string()),
    )


def _last_exchange(
    messages: pa.ChunkedArray, name: str, where: str
) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Per chat: the last assistant message, the user turn before it, the turns before that.

    Earlier turns come back as a JSON list of {role, content}; a chat without a
    user turn answered by an assistant turn gives nulls (dropped and counted).
    """
    import json

    kind = messages.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise InputError(f"{where}: column '{name}' must hold lists of {{role, content}} messages")
    prompts, reals, contexts = [], [], []
    for chat in messages.to_pylist():
        turns = [m for m in chat or [] if isinstance(m, dict) and m.get("content") is not None]
        last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=-1)
        user = max((i for i in range(last) if turns[i].get("role") == "user"), default=-1)
        if user < 0:
            prompts.append(None), reals.append(None), contexts.append(None)
            continue
        earlier = [{"role": m["role"], "content": m["content"]} for m in turns[:user]]
        prompts.append(turns[user]["content"])
        reals.append(turns[last]["content"])
        contexts.append(json.dumps(earlier, ensure_ascii=False))
    text = pa.large_string()
    return pa.array(prompts, text), pa.array(reals, text), pa.array(contexts, text)


def _first_per_chat(position: np.ndarray, chat: np.ndarray, num_chats: int) -> np.ndarray:
    """Per chat, the first of the (chat-sorted) `position`s, or -1 when it has none."""
    first = np.full(num_chats, -1, dtype=np.int64)
    starts = np.ones(len(chat), dtype=bool)
    starts[1:] = chat[1:] != chat[:-1]
    first[chat[starts]] = position[starts]
    return first


def _non_blank(text: pa.Array) -> pa.Array:
    return pc.fill_null(pc.greater(pc.binary_length(pc.utf8_trim_whitespace(text)), 0), False)


# ------------------------------------------------------- held-out and SFT data


def split_heldout(
    pairs: pd.DataFrame, *, eval_size: int, seed: int, source: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, heldout): `eval_size` seeded rows held out, both in source order."""
    source = source or pairs.attrs.get("source", "the dataset")
    if eval_size >= len(pairs):
        raise InputError(
            f"data.eval_size ({eval_size}) must be smaller than the {len(pairs)} usable rows "
            f"of {source}"
        )
    rng = np.random.default_rng([_HELDOUT_STREAM, seed])
    held = np.zeros(len(pairs), dtype=bool)
    held[rng.permutation(len(pairs))[:eval_size]] = True
    return pairs[~held].reset_index(drop=True), pairs[held].reset_index(drop=True)


def load_sft_data(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Training pairs, held-out pairs and counts for the report.

    Held-out pairs are `eval_size` rows of `cfg.eval_dataset` when it is set
    (seeded subset when it has more), else `eval_size` rows held out of
    `cfg.dataset`. Training pairs whose prompt is also a held-out prompt are
    removed, so held-out metrics never score a prompt that was trained on.
    """
    columns = dict(
        messages_column=cfg.messages_column,
        prompt_column=cfg.prompt_column,
        response_column=cfg.response_column,
        prompt_turns=cfg.prompt_turns,
        revision=cfg.revision,
    )
    pairs, load_stats = load_pairs(cfg.dataset, split=cfg.split, **columns)
    stats: dict = {"dataset": load_stats.as_dict()}
    if cfg.eval_dataset:
        heldout, eval_stats = load_pairs(cfg.eval_dataset, split=cfg.eval_split, **columns)
        stats["eval_dataset"] = eval_stats.as_dict()
        if len(heldout) > cfg.eval_size:
            rng = np.random.default_rng([_EVAL_SUBSET_STREAM, cfg.seed])
            keep = np.sort(rng.permutation(len(heldout))[: cfg.eval_size])
            heldout = heldout.iloc[keep].reset_index(drop=True)
        train = pairs
    else:
        train, heldout = split_heldout(
            pairs, eval_size=cfg.eval_size, seed=cfg.seed, source=cfg.dataset
        )
    del pairs  # the split holds a copy; the full frame can go

    overlap = train["prompt"].isin(set(heldout["prompt"]))
    if overlap.any():
        train = train[~overlap].reset_index(drop=True)
    if train.empty:
        raise InputError(
            f"{cfg.dataset}: every prompt also occurs in the held-out data "
            f"({cfg.eval_dataset or 'data.eval_size'}); nothing is left to train on"
        )
    train.attrs["source"] = cfg.dataset
    heldout.attrs["source"] = cfg.eval_dataset or cfg.dataset
    stats.update(
        train_rows=len(train),
        heldout_rows=len(heldout),
        heldout_source=cfg.eval_dataset or f"{cfg.dataset} (held out, seed {cfg.seed})",
        dropped_heldout_overlap=int(overlap.sum()),
    )
    return train, heldout, stats


# ------------------------------------------------------------- SPIN step 1


def sample_prompts(
    pairs: pd.DataFrame,
    num_prompts: int,
    *,
    seed: int,
    iteration: int = 0,
    resample: bool = False,
    source: str | None = None,
) -> pd.DataFrame:
    """`num_prompts` (id, prompt, real) rows drawn without replacement, seeded.

    The paper fixes one sample for all iterations: the same rows come back for
    every `iteration` unless `resample`, which mixes the iteration into the seed.
    A larger sample with the same seed extends a smaller one (a prefix).
    """
    source = source or pairs.attrs.get("source", "the dataset")
    if num_prompts > len(pairs):
        raise InputError(
            f"data.num_prompts ({num_prompts}) is larger than the {len(pairs)} usable rows "
            f"of {source}"
        )
    key = [_SAMPLE_STREAM, seed, iteration] if resample else [_SAMPLE_STREAM, seed]
    chosen = np.random.default_rng(key).permutation(len(pairs))[:num_prompts]
    columns = [c for c in [*PAIR_COLUMNS, *OPTIONAL_COLUMNS] if c in pairs]
    return pairs.iloc[chosen][columns].reset_index(drop=True)


# ------------------------------------------------------------- SPIN step 3


@dataclass
class TrainingSetStats:
    """Counts of a training set D_t.

    `identical_dropped` counts dropped pairs over all mixed-in iterations;
    `identical_fraction` is the share of identical pairs among the current
    iteration's generations (how close the opponent is to the data).
    """

    rows: int
    identical_dropped: int
    identical_fraction: float
    per_iteration: dict[int, int] = field(default_factory=dict)


def build_training_set(
    generated: dict[int, pd.DataFrame], *, drop_identical: bool = True
) -> tuple[pd.DataFrame, TrainingSetStats]:
    """D_t: the (prompt, real, generated) pairs of the current iteration and its history.

    `generated` maps iteration -> that iteration's generated.parquet frame; the
    largest key is the current iteration. Output columns: `TRAINING_COLUMNS`. With
    `drop_identical`, pairs whose generated token ids equal the real ones are
    dropped and counted: their SPIN margin is 0 by construction, so they add no
    gradient, only cost.
    """
    if not generated:
        raise ValueError("build_training_set needs at least one iteration's generations")
    current = max(generated)
    frames, per_iteration = [], {}
    identical_dropped, identical_current, rows_current = 0, 0, 0
    for iteration in sorted(generated):
        frame = generated[iteration]
        missing = [c for c in TRAINING_COLUMNS[:-1] if c not in frame.columns]
        if missing:
            raise InputError(
                f"generations of iteration {iteration}: missing column(s) {', '.join(missing)} "
                f"(found: {', '.join(map(str, frame.columns))})"
            )
        frame = frame[TRAINING_COLUMNS[:-1]].assign(source_iteration=iteration)
        # Decided on tokens: what training would score, not the decoded text.
        identical = np.array(
            [
                len(g) == len(r) and bool(np.all(np.asarray(g) == np.asarray(r)))
                for g, r in zip(frame["generated_ids"], frame["real_ids"], strict=True)
            ],
            dtype=bool,
        )
        if iteration == current:
            identical_current, rows_current = int(identical.sum()), len(frame)
        if drop_identical:
            identical_dropped += int(identical.sum())
            frame = frame[~identical]
        per_iteration[iteration] = len(frame)
        frames.append(frame)

    training_set = pd.concat(frames, ignore_index=True)
    training_set["source_iteration"] = training_set["source_iteration"].astype("int64")
    stats = TrainingSetStats(
        rows=len(training_set),
        identical_dropped=identical_dropped,
        identical_fraction=identical_current / rows_current if rows_current else 0.0,
        per_iteration=per_iteration,
    )
    if training_set.empty and not identical_dropped:
        raise InputError(
            f"generations of iteration(s) {', '.join(map(str, sorted(generated)))} have no rows"
        )
    if training_set.empty:
        raise InputError(
            f"every generated response of iteration(s) {', '.join(map(str, sorted(generated)))} "
            "equals its real one: nothing to train on (the opponent already reproduces "
            "the data; SPIN's fixed point)"
        )
    return training_set, stats
