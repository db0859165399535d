"""Loading SFT pairs, sampling prompts, building training sets, atomic Parquet IO."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from spin_core.config import DataConfig
from spin_core.data import (
    TRAINING_COLUMNS,
    build_training_set,
    load_pairs,
    load_sft_data,
    pair_id,
    sample_prompts,
    split_heldout,
)
from spin_core.errors import InputError
from spin_core.storage.files import read_parquet_checked, write_parquet_atomic


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_messages_parquet(path: Path, chats: list[list[dict] | None]) -> Path:
    pq.write_table(pa.table({"messages": chats}), path)
    return path


def numbered_pairs(n: int) -> pd.DataFrame:
    prompts = [f"prompt {i}" for i in range(n)]
    reals = [f"answer {i}" for i in range(n)]
    ids = [pair_id(p, r) for p, r in zip(prompts, reals, strict=True)]
    return pd.DataFrame({"id": ids, "prompt": prompts, "real": reals})


# ------------------------------------------------------------------ loading


def test_messages_parquet_takes_first_user_turn_and_first_reply_after_it(tmp_path):
    path = write_messages_parquet(
        tmp_path / "chats.parquet",
        [
            chat(
                ("system", "be brief"),
                ("assistant", "greeting before any user turn"),
                ("user", "What is 2+2?"),
                ("assistant", "4"),
                ("user", "And 3+3?"),
                ("assistant", "6"),
            ),
            chat(("user", "Reverse abc"), ("assistant", "cba")),
        ],
    )
    pairs, stats = load_pairs(str(path))

    assert list(pairs.columns) == ["id", "prompt", "real"]
    assert pairs["prompt"].tolist() == ["What is 2+2?", "Reverse abc"]
    assert pairs["real"].tolist() == ["4", "cba"]
    assert pairs["id"].tolist() == [pair_id("What is 2+2?", "4"), pair_id("Reverse abc", "cba")]
    assert (stats.rows, stats.dropped_empty, stats.dropped_duplicates) == (2, 0, 0)


def test_two_column_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"question": "q1", "answer": "a1", "other": 1}, {"question": "q2", "answer": "a2"}],
    )
    pairs, _ = load_pairs(str(path), prompt_column="question", response_column="answer")
    assert pairs[["prompt", "real"]].values.tolist() == [["q1", "a1"], ["q2", "a2"]]


def test_messages_jsonl_and_json_array(tmp_path):
    rows = [{"messages": chat(("user", f"q{i}"), ("assistant", f"a{i}"))} for i in range(3)]
    lines = write_jsonl(tmp_path / "chats.jsonl", rows)
    array = tmp_path / "chats.json"
    array.write_text(json.dumps(rows))

    for path in (lines, array):
        pairs, _ = load_pairs(str(path))
        assert pairs["prompt"].tolist() == ["q0", "q1", "q2"], path
        assert pairs["real"].tolist() == ["a0", "a1", "a2"], path


def test_directory_reads_every_file_in_name_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"messages": chat(("user", "q2"), ("assistant", "a2"))}])
    write_messages_parquet(
        tmp_path / "a.parquet",
        [chat(("user", "q0"), ("assistant", "a0")), chat(("user", "q1"), ("assistant", "a1"))],
    )
    (tmp_path / "README.md").write_text("not data")

    pairs, stats = load_pairs(str(tmp_path))
    assert pairs["prompt"].tolist() == ["q0", "q1", "q2"]
    assert stats.rows == 3


def test_hub_name_goes_through_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split, revision):
        calls.append((name, split, revision))
        rows = [chat(("user", "hub q"), ("assistant", "hub a"))]
        return datasets.Dataset.from_dict({"messages": rows, "prompt_id": ["x"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, stats = load_pairs("HuggingFaceH4/ultrachat_200k", split="train_sft")
    assert calls == [("HuggingFaceH4/ultrachat_200k", "train_sft", None)]  # unpinned
    assert pairs[["prompt", "real"]].values.tolist() == [["hub q", "hub a"]]
    assert stats.source == "HuggingFaceH4/ultrachat_200k"


def test_empty_and_turnless_rows_are_dropped_and_counted(tmp_path):
    path = write_messages_parquet(
        tmp_path / "chats.parquet",
        [
            chat(("user", "kept"), ("assistant", "yes")),
            chat(("user", "   \n"), ("assistant", "blank prompt")),
            chat(("user", "blank reply"), ("assistant", "\t")),
            chat(("user", "never answered")),
            chat(("assistant", "answer only"), ("user", "question after it")),
            [],
            None,
        ],
    )
    pairs, stats = load_pairs(str(path))
    assert pairs["prompt"].tolist() == ["kept"]
    assert (stats.rows, stats.dropped_empty, stats.rows_read) == (1, 6, 7)


def test_exact_duplicates_are_dropped_keeping_the_first(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"p": "same", "r": "one"},
            {"p": "same", "r": "one"},
            {"p": "same", "r": "two"},  # same prompt, other response: a different pair
        ],
    )
    pairs, stats = load_pairs(str(path), prompt_column="p", response_column="r")
    assert pairs["real"].tolist() == ["one", "two"]
    assert stats.dropped_duplicates == 1


def test_pair_ids_are_stable_and_distinct():
    assert pair_id("x", "y") == pair_id("x", "y")
    assert len(pair_id("x", "y")) == 16
    assert len({pair_id("x", "y"), pair_id("y", "x"), pair_id("x", "z"), pair_id("xy", "")}) == 4


def test_ids_are_the_same_across_loads_and_formats(tmp_path):
    rows = [{"messages": chat(("user", f"q{i}"), ("assistant", f"a{i}"))} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "chats.jsonl", rows)
    parquet = write_messages_parquet(tmp_path / "chats.parquet", [r["messages"] for r in rows])
    first, _ = load_pairs(str(jsonl))
    again, _ = load_pairs(str(jsonl))
    other_format, _ = load_pairs(str(parquet))
    assert first["id"].tolist() == again["id"].tolist() == other_format["id"].tolist()


# ------------------------------------------------------------------ bad input


def test_all_turns_makes_earlier_turns_the_context_of_the_last_answer(tmp_path):
    chats = pd.DataFrame(
        {
            "messages": [
                [
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a2"},
                ],
                [{"role": "user", "content": "only"}, {"role": "assistant", "content": "one"}],
                [{"role": "user", "content": "unanswered"}],
            ]
        }
    )
    path = tmp_path / "chats.parquet"
    chats.to_parquet(path)
    first, _ = load_pairs(str(path))
    assert first[["prompt", "real"]].values.tolist() == [["q1", "a1"], ["only", "one"]]
    assert "context" not in first
    every, stats = load_pairs(str(path), prompt_turns="all")
    assert every[["prompt", "real"]].values.tolist() == [["q2", "a2"], ["only", "one"]]
    assert json.loads(every["context"][0]) == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
    ]
    assert json.loads(every["context"][1]) == []
    assert stats.dropped_empty == 1


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.parquet"
    with pytest.raises(InputError) as error:
        load_pairs(str(missing))
    assert_one_line(error, str(missing), "not found")


def test_file_that_is_not_parquet_is_named(tmp_path):
    bad = tmp_path / "data.parquet"
    bad.write_text("prompt,response\nhello,world\n")
    with pytest.raises(InputError) as error:
        load_pairs(str(bad))
    assert_one_line(error, str(bad), "not a readable Parquet file")


def test_missing_column_names_it_and_lists_found_columns(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(InputError) as error:
        load_pairs(str(path))
    assert_one_line(error, str(path), "'messages'", "'instruction'", "'output'")

    with pytest.raises(InputError) as error:
        load_pairs(str(path), prompt_column="instruction", response_column="response")
    assert_one_line(error, "no column 'response'", "'output'")


def test_messages_column_of_the_wrong_shape(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"messages": "just a string"}])
    with pytest.raises(InputError) as error:
        load_pairs(str(path))
    assert_one_line(error, str(path), "'messages'", "{role, content}")


def test_no_usable_rows(tmp_path):
    path = write_messages_parquet(
        tmp_path / "chats.parquet", [chat(("user", "q")), chat(("user", " "), ("assistant", "a"))]
    )
    with pytest.raises(InputError) as error:
        load_pairs(str(path))
    assert_one_line(error, str(path), "no usable rows", "read 2")


def test_too_few_rows_for_num_prompts_names_the_field():
    pairs = numbered_pairs(40)
    pairs.attrs["source"] = "data/sft.parquet"
    with pytest.raises(InputError) as error:
        sample_prompts(pairs, 50, seed=0)
    assert_one_line(error, "data.num_prompts (50)", "40 usable rows", "data/sft.parquet")


# ------------------------------------------------------------ sample, split


def test_sample_is_seeded_and_fixed_across_iterations():
    pairs = numbered_pairs(1000)
    first = sample_prompts(pairs, 100, seed=7)
    assert list(first.columns) == ["id", "prompt", "real"]
    assert first["id"].is_unique and len(first) == 100
    assert first.equals(sample_prompts(pairs, 100, seed=7))
    assert first.equals(sample_prompts(pairs, 100, seed=7, iteration=3))
    assert set(first["id"]) != set(sample_prompts(pairs, 100, seed=8)["id"])


def test_resample_draws_a_new_reproducible_sample_per_iteration():
    pairs = numbered_pairs(1000)
    it1 = sample_prompts(pairs, 100, seed=7, iteration=1, resample=True)
    it2 = sample_prompts(pairs, 100, seed=7, iteration=2, resample=True)
    assert set(it1["id"]) != set(it2["id"])
    assert it1.equals(sample_prompts(pairs, 100, seed=7, iteration=1, resample=True))


def test_heldout_split_is_disjoint_and_deterministic():
    pairs = numbered_pairs(300)
    train, heldout = split_heldout(pairs, eval_size=50, seed=3)
    assert (len(train), len(heldout)) == (250, 50)
    assert not set(train["id"]) & set(heldout["id"])
    assert heldout.equals(split_heldout(pairs, eval_size=50, seed=3)[1])
    with pytest.raises(InputError, match=r"data.eval_size \(300\)"):
        split_heldout(pairs, eval_size=300, seed=3)


def test_sft_data_removes_heldout_prompts_from_train(tmp_path):
    rows = [{"p": f"q{i}", "r": f"a{i}"} for i in range(200)]
    rows += [{"p": f"q{i}", "r": f"other answer {i}"} for i in range(200)]  # every prompt twice
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = DataConfig(dataset=str(path), prompt_column="p", response_column="r", eval_size=20)

    train, heldout, stats = load_sft_data(cfg)
    assert len(heldout) == 20
    assert not set(train["prompt"]) & set(heldout["prompt"])
    # Each held-out prompt's twin is either held out too or removed from train.
    twins_removed = 2 * heldout["prompt"].nunique() - 20
    assert stats["dropped_heldout_overlap"] == twins_removed > 0
    assert stats["train_rows"] == len(train) == 400 - 20 - twins_removed


def test_sft_data_with_a_separate_eval_dataset(tmp_path):
    train_path = write_jsonl(
        tmp_path / "train.jsonl", [{"p": f"q{i}", "r": f"a{i}"} for i in range(100)]
    )
    eval_path = write_jsonl(
        tmp_path / "eval.jsonl", [{"p": f"q{i}", "r": f"a{i}"} for i in range(90, 130)]
    )
    cfg = DataConfig(
        dataset=str(train_path),
        eval_dataset=str(eval_path),
        prompt_column="p",
        response_column="r",
        eval_size=30,
    )
    train, heldout, stats = load_sft_data(cfg)
    assert len(heldout) == 30
    assert set(heldout["prompt"]) <= {f"q{i}" for i in range(90, 130)}
    assert not set(train["prompt"]) & set(heldout["prompt"])
    assert stats["heldout_source"] == str(eval_path)


# ---------------------------------------------------------------- training set


EOS = 2


def _ids(text: str, eos: bool = True) -> list[int]:
    return [ord(c) for c in text] + ([EOS] if eos else [])


def generations(iteration: int, n: int, identical: int) -> pd.DataFrame:
    pairs = numbered_pairs(n)
    generated = [
        real if i < identical else f"gen {iteration}.{i}" for i, real in enumerate(pairs.real)
    ]
    return pairs.assign(
        prompt_ids=[_ids(p, eos=False) for p in pairs.prompt],
        real_ids=[_ids(r) for r in pairs.real],
        generated=generated,
        generated_ids=[_ids(g) for g in generated],
        finish_reason="stop",
        opponent=f"iter_{iteration}",
    )


def test_training_set_mixes_iterations_and_drops_identical_pairs():
    training_set, stats = build_training_set(
        {0: generations(0, 10, identical=2), 1: generations(1, 10, identical=5)}
    )
    assert list(training_set.columns) == TRAINING_COLUMNS
    assert (training_set["generated"] != training_set["real"]).all()
    assert training_set["source_iteration"].value_counts().to_dict() == {0: 8, 1: 5}
    assert stats.rows == 13
    assert stats.identical_dropped == 7
    assert stats.identical_fraction == pytest.approx(0.5)  # of iteration 1, the current one
    assert stats.per_iteration == {0: 8, 1: 5}


def test_training_set_keeps_identical_pairs_when_asked():
    training_set, stats = build_training_set(
        {0: generations(0, 10, identical=4)}, drop_identical=False
    )
    assert len(training_set) == 10
    assert stats.identical_dropped == 0
    assert stats.identical_fraction == pytest.approx(0.4)


def test_identical_pairs_are_decided_on_token_ids_not_text():
    """A generation cut at max_new_tokens whose text equals y is no tie: it lacks y's EOS."""
    frame = generations(0, 4, identical=4)
    frame.loc[0, "finish_reason"] = "length"
    frame.at[0, "generated_ids"] = _ids(frame.loc[0, "generated"], eos=False)
    training_set, stats = build_training_set({0: frame})
    assert training_set["id"].tolist() == [frame.loc[0, "id"]]
    assert stats.identical_dropped == 3


def test_all_identical_generations_leave_nothing_to_train_on():
    with pytest.raises(InputError) as error:
        build_training_set({2: generations(2, 5, identical=5)})
    assert_one_line(error, "equals its real one", "nothing to train on")


# --------------------------------------------------------------------- Parquet IO


def test_atomic_write_round_trips_and_leaves_no_temp_files(tmp_path):
    frame = numbered_pairs(50)
    path = write_parquet_atomic(frame, tmp_path / "iter_0" / "prompts.parquet")
    write_parquet_atomic(pa.Table.from_pandas(frame), path)  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["prompts.parquet"]
    assert read_parquet_checked(path, expected_rows=50)[["id", "prompt", "real"]].equals(frame)


def test_truncated_or_short_files_are_reported_for_redoing(tmp_path):
    frame = numbered_pairs(50)
    path = write_parquet_atomic(frame, tmp_path / "generated.parquet")

    assert read_parquet_checked(tmp_path / "missing.parquet") is None
    assert read_parquet_checked(path, expected_rows=49) is None

    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    assert read_parquet_checked(path) is None


# ---------------------------------------------------------------------- speed


def ultrachat_like(n: int, turns: int = 3) -> pa.Table:
    """`n` multi-turn chats with distinct contents, built without a Python loop."""
    messages = n * turns * 2
    index = pa.array(np.arange(messages)).cast(pa.string())
    is_user = pa.array(np.arange(messages) % 2 == 0)
    role = pc.if_else(is_user, "user", "assistant")
    prefix = pc.if_else(is_user, "Please explain topic ", "Here is an explanation of ")
    filler = " and why it matters, with some detail about the context." * 8
    content = pc.binary_join_element_wise(prefix, index, filler, "")
    offsets = pa.array(np.arange(0, messages + 1, turns * 2, dtype=np.int32))
    chats = pa.ListArray.from_arrays(
        offsets, pa.StructArray.from_arrays([content, role], names=["content", "role"])
    )
    return pa.table({"prompt_id": pa.array(np.arange(n)), "messages": chats})


def test_200k_chats_load_clean_and_sample_in_seconds(tmp_path):
    path = tmp_path / "ultrachat.parquet"
    pq.write_table(ultrachat_like(200_000), path)

    start = time.perf_counter()
    pairs, stats = load_pairs(str(path))
    sample = sample_prompts(pairs, 50_000, seed=42)
    elapsed = time.perf_counter() - start

    assert stats.rows == 200_000
    # Chat 1 holds messages 6..11: its first user turn and the reply right after it.
    assert pairs["prompt"].iloc[1].startswith("Please explain topic 6 and")
    assert pairs["real"].iloc[1].startswith("Here is an explanation of 7 and")
    assert len(sample) == 50_000
    assert elapsed < 20, f"load + sample of 200k chats took {elapsed:.1f} s"
