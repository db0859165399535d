"""Pre-flight check of a SPIN config: everything short of generating and training, in seconds.

`preflight(cfg)` reads what a run would read and computes what it would need, without
loading weights or touching a GPU:

1. the tokenizer and the model's config (AutoConfig; the parameters are counted on the
   `meta` device, so a 7B model costs no memory);
2. one row of the data rendered and tokenized exactly as training sees it (the one
   tokenization of `spin_core.prompts`), with `|` where the response starts;
3. prompt and response token lengths over a sample of the training data, and what
   `training.max_prompt_length`, `training.max_length` and `generation.max_new_tokens`
   would cut or drop;
4. optimizer steps per iteration;
5. GPU memory per rank for the configured ZeRO stage, precision, optimizer, micro-batch
   and gradient checkpointing.

It returns a `PreflightReport`: `.render()` is the readable report, `.problems` the
reasons the run cannot work (each names the field to change; the command line exits 2
when there are any). The embedded default (`toy`) is built by the first run; until
then its tokenizer, data and model are not there and those parts are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spin_core.config import TOY, SpinConfig
from spin_core.errors import InputError
from spin_core.storage.rundir import toy_artifacts
from spin_core.training.memory import (
    GIB,
    OPTIMIZER_STATES,
    MemoryEstimate,
    ModelShape,
    generation_memory,
    generation_memory_lines,
    generation_memory_problem,
    lora_parameters,
    memory_for,
    memory_problem,
    model_shape,
    uses_bf16,
)

DEFAULT_GPU_MEMORY_GIB = 80.0
SAMPLE_ROWS = 2000  # training rows tokenized for the length statistics
PERCENTILES = (50, 90, 99)


# ------------------------------------------------------------------------ steps


@dataclass
class StepRow:
    iterations: str  # "0", "1–3"
    pairs: int  # upper bound: identical pairs are dropped
    steps_per_epoch: int
    steps: int
    count: int  # iterations in this row


def optimizer_steps(cfg: SpinConfig) -> list[StepRow]:
    """Optimizer steps per iteration: iteration t trains on num_prompts × (1 + min(history, t))
    pairs (its own and its `data.history` predecessors'), num_epochs times over."""
    from spin_core.training.train import steps_per_epoch

    rows: list[StepRow] = []
    for t in range(cfg.run.iterations):
        pairs = cfg.data.num_prompts * (1 + min(cfg.data.history, t))
        per_epoch = steps_per_epoch(pairs, cfg.training.global_batch_size)
        if rows and rows[-1].pairs == pairs:
            first = rows[-1].iterations.split("–")[0]
            rows[-1].iterations, rows[-1].count = f"{first}–{t}", rows[-1].count + 1
            continue
        rows.append(StepRow(str(t), pairs, per_epoch, per_epoch * cfg.training.num_epochs, 1))
    return rows


# ------------------------------------------------------------------------- data


@dataclass
class LengthStats:
    """Token lengths over a sample of the training rows (the real tokenization)."""

    sample: int
    rows: int  # training rows the sample was drawn from
    prompt: list[int]  # p50, p90, p99, max
    response: list[int]
    prompts_over: int  # longer than max_prompt_length
    responses_cut: int  # prompt (after truncation) + response > max_length, of kept rows
    kept: int  # sampled rows that survive data.overlong_prompts
    responses_over_new_tokens: int  # real responses longer than generation.max_new_tokens

    @property
    def exact(self) -> bool:
        return self.sample == self.rows


def _percentiles(lengths: list[int]) -> list[int]:
    values = np.asarray(lengths)
    return [int(np.percentile(values, q, method="higher")) for q in PERCENTILES] + [
        int(values.max())
    ]


def length_stats(
    tokenizer, train, cfg: SpinConfig, *, sample_rows: int = SAMPLE_ROWS
) -> tuple[LengthStats, Any]:
    """Length statistics of a seeded sample of `train`, and the sample (with token ids)."""
    from spin_core.prompts import encode_conversations, frame_conversations

    chosen = np.sort(np.random.default_rng(cfg.data.seed).permutation(len(train))[:sample_rows])
    sample = train.iloc[chosen].reset_index(drop=True)
    prompt_ids, real_ids = encode_conversations(
        tokenizer, frame_conversations(sample), sample["real"].tolist()
    )  # InputError when the template cannot split prompt from response
    training = cfg.training
    over = [len(p) > training.max_prompt_length for p in prompt_ids]
    keep = [not o for o in over] if cfg.data.overlong_prompts == "drop" else [True] * len(over)
    cut = sum(
        min(len(p), training.max_prompt_length) + len(r) > training.max_length
        for p, r, k in zip(prompt_ids, real_ids, keep, strict=True)
        if k
    )
    stats = LengthStats(
        sample=len(sample),
        rows=len(train),
        prompt=_percentiles([len(p) for p in prompt_ids]),
        response=_percentiles([len(r) for r in real_ids]),
        prompts_over=sum(over),
        responses_cut=cut,
        kept=sum(keep),
        responses_over_new_tokens=sum(len(r) > cfg.generation.max_new_tokens for r in real_ids),
    )
    return stats, sample.assign(prompt_ids=prompt_ids, real_ids=real_ids)


def _piece(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣")


def _tokens(tokenizer, ids: list[int], head: int, tail: int) -> str:
    pieces = [
        f"{i}:{_piece(t)}" for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)
    ]
    if len(pieces) > head + tail + 1:
        pieces = [*pieces[:head], f"…({len(pieces) - head - tail} more)…", *pieces[-tail:]]
    return " ".join(pieces)


def _text(text: str, limit: int = 240) -> str:
    if len(text) > limit:
        text = text[: limit * 2 // 3] + " … " + text[-limit // 3 :]
    return repr(text)


def _wrap(line: str, width: int = 100) -> list[str]:
    out, current = [], ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > width:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*out, current] if current else out


def tokenization_lines(tokenizer, row) -> list[str]:
    """One row rendered as the prompt and as the conversation, and its tokens with `|`."""
    from spin_core.prompts import encode_conversations, prompt_messages, render

    messages = prompt_messages(row["prompt"], row.get("context"))
    lines = [
        f"prompt:       {_text(render(tokenizer, messages))}",
        f"conversation: {_text(render(tokenizer, messages, row['real']))}",
    ]
    try:
        (prompt_ids,), (response_ids,) = encode_conversations(tokenizer, [messages], [row["real"]])
    except InputError as exc:
        return [*lines, f"tokens: cannot split prompt from response ({exc})"]
    lines.append(
        f"tokens: {len(prompt_ids)} prompt | {len(response_ids)} response "
        "(id:piece; `|` marks where the response starts; generation continues from the prompt)"
    )
    shown = f"{_tokens(tokenizer, prompt_ids, 14, 10)} | {_tokens(tokenizer, response_ids, 12, 4)}"
    return [*lines, *("  " + part for part in _wrap(shown))]


# ----------------------------------------------------------------------- report


@dataclass
class PreflightReport:
    """What `preflight` found: sections of the report, and the problems that stop a run."""

    title: str
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shape: ModelShape | None = None
    memory: MemoryEstimate | None = None
    steps: list[StepRow] = field(default_factory=list)
    lengths: LengthStats | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        out = [f"# {self.title}", ""]
        for heading, lines in self.sections:
            out += [f"## {heading}", "", *lines, ""]
        if self.notes:
            out += ["## Notes", "", *(f"- {n}" for n in self.notes), ""]
        if self.problems:
            out += [f"## Problems ({len(self.problems)}): this run cannot work", ""]
            out += [f"- {p}" for p in self.problems]
        else:
            out.append("Result: ok, nothing found that stops this run.")
        return "\n".join(out).rstrip() + "\n"


def _pct(part: int, whole: int) -> str:
    return f"{part} of {whole} ({100 * part / whole:.1f} %)" if whole else "0"


def _toy_built(toy_dir: Path) -> bool:
    from spin_core.toy import MARKER

    return (toy_dir / MARKER).is_file() and toy_artifacts(toy_dir).model_dir.is_dir()


def preflight(
    cfg: SpinConfig,
    *,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
    run_dir: str | Path | None = None,
    source: str = "config",
) -> PreflightReport:
    """Check a config without generating or training; see the module docstring.

    `run_dir` (default runs/<run.name>) is only where a built embedded default is looked
    for. Raises InputError for inputs that cannot be read at all (a missing model
    directory or data file); everything else that stops a run is in `.problems`.
    """
    from spin_core.storage.rundir import RunDir

    report = PreflightReport(title=f"spin check: {source}")
    run = RunDir(run_dir or Path("runs") / cfg.run.name)
    gpu = gpu_memory_gib * GIB
    toy_ready = _toy_built(run.toy)
    if cfg.uses_toy() and not toy_ready:
        report.notes.append(
            f"the embedded default (`toy`) is built by the first run (about 30 s; `spin demo` "
            f"or `spin run`) and is not built yet in {run.toy}: "
            + " and ".join(
                part
                for part, skipped in (
                    ("the data", cfg.data.dataset == TOY),
                    (
                        "the tokenizer, token lengths and memory estimate",
                        cfg.model.name_or_path == TOY,
                    ),
                )
                if skipped
            )
            + " are skipped"
        )
    model_ready = cfg.model.name_or_path != TOY or toy_ready
    data_ready = cfg.data.dataset != TOY or toy_ready
    if not data_ready and cfg.data.num_prompts > cfg.toy.num_train:
        report.problems.append(
            f"data.num_prompts ({cfg.data.num_prompts}) is larger than the toy's "
            f"{cfg.toy.num_train} training pairs (toy.num_train)"
        )

    # Model: config and tokenizer, never the weights.
    tokenizer = _model_section(report, cfg, run) if model_ready else None

    # Data: lengths over a sample, with the one tokenization.
    if data_ready:
        from spin_core.data import load_sft_data

        train, heldout, stats = load_sft_data(run.data_config(cfg))
        data_lines = [
            f"training rows: {len(train)} (after removing held-out prompts); held out: "
            f"{len(heldout)} from {stats['heldout_source']}"
        ]
        if cfg.data.num_prompts > len(train):
            report.problems.append(
                f"data.num_prompts ({cfg.data.num_prompts}) is larger than the {len(train)} "
                f"usable training rows of {cfg.data.dataset}"
            )
        if tokenizer is not None:
            data_lines += _data_section(report, tokenizer, train, cfg)
        report.sections.append(("Data", data_lines))

    # Steps: needs only the config.
    report.steps = optimizer_steps(cfg)
    report.sections.append(("Optimizer steps", _steps_lines(cfg, report.steps)))

    # Memory: needs the model's shape.
    if report.shape is not None:
        memory = memory_for(cfg, report.shape)
        report.memory = memory
        lines = _memory_lines(memory, gpu)
        if cfg.model.precision == "auto":
            lines.append("model.precision auto: bf16 on GPUs (compute_dtype), as estimated here.")
        report.sections.append(("GPU memory per rank (estimate)", lines))
        if not memory.fits(gpu):
            report.problems.append(memory_problem(cfg, report.shape, memory, gpu))
        generation = generation_memory(cfg, report.shape, gpu)
        lines = generation_memory_lines(generation, cfg, gpu)
        report.sections.append(("GPU memory per generation worker (estimate)", lines))
        if not generation.fits():
            report.problems.append(generation_memory_problem(generation, cfg, gpu))
    _disk_section(report, cfg, run.root)
    return report


def _model_section(report: PreflightReport, cfg: SpinConfig, run) -> Any:
    """θ0's shape and tokenizer (config files only, never the weights); returns the tokenizer."""
    from spin_core.prompts import template_name
    from spin_core.storage.models import load_tokenizer

    path = run.base_model(cfg)
    shape = model_shape(path, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    report.shape = shape
    special = ", ".join(f"{k} {getattr(tokenizer, k + '_token')!r}" for k in ("bos", "eos", "pad"))
    report.sections.append(
        (
            "Model",
            [
                f"θ0: {path}",
                f"shape: {shape.describe()}",
                f"tokenizer: {type(tokenizer).__name__}, template "
                f"{template_name(tokenizer)!r}, vocab {len(tokenizer)}, {special}",
            ],
        )
    )
    longest = shape.max_position_embeddings
    if longest and cfg.training.max_length > longest:
        report.notes.append(
            f"training.max_length ({cfg.training.max_length}) exceeds the model's "
            f"max_position_embeddings ({longest})"
        )
    return tokenizer


def _disk_section(report: PreflightReport, cfg: SpinConfig, run_dir: Path) -> None:
    """The disk estimate (needs the model's shape); a problem when the run cannot fit."""
    if report.shape is None:
        return
    disk = estimate_disk(cfg, report.shape, run_dir)
    lines = disk.lines() + checkpoint_write_lines(disk.checkpoint, cfg, report.steps)
    report.sections.append(("Disk (estimate)", lines))
    if not disk.fits():
        report.problems.append(disk.problem())


# The write speed the checkpoint times are given at: a fast local NVMe or parallel
# filesystem; shared NFS is often 5-10 times slower.
CHECKPOINT_WRITE_BYTES_PER_S = 1e9


def checkpoint_write_lines(checkpoint: int, cfg: SpinConfig, steps: list[StepRow]) -> list[str]:
    """What `training.save_steps` costs: the checkpoints each iteration writes (one every
    save_steps steps and one at its end), in bytes and in minutes at 1 GB/s."""
    save_steps = cfg.training.save_steps
    parts = []
    for row in steps:
        saves = math.ceil(row.steps / save_steps)
        written = saves * checkpoint
        minutes = written / CHECKPOINT_WRITE_BYTES_PER_S / 60
        parts.append(
            f"iteration {row.iterations}: {saves} × {checkpoint / GIB:.2f} GiB = "
            f"{written / GIB:.1f} GiB, {minutes:.0f} min at 1 GB/s"
        )
    return [
        f"checkpoint writes (one every training.save_steps = {save_steps} steps, a crash "
        f"redoes at most that many): " + "; ".join(parts)
    ]


@dataclass
class DiskEstimate:
    """Bytes a run writes into its run directory, and the free space there."""

    model: int  # one exported model directory
    checkpoint: int  # one DeepSpeed checkpoint (all ranks' shards)
    data: int  # one iteration's Parquet files (upper bound)
    iterations: int
    kept_checkpoints: int  # per iteration while it trains (keep_checkpoints + the one being saved)
    keep_finished_state: bool
    models_per_iteration: int  # 2 with the SFT baseline
    where: Path
    free: int

    def per_iteration(self) -> int:
        return self.models_per_iteration * self.model + self.data

    def needed(self) -> int:
        """Peak use of the whole run: finished iterations keep their models and data (and
        checkpoints with keep_finished_state); the iteration in training holds its own."""
        training = self.models_per_iteration * self.kept_checkpoints * self.checkpoint
        kept = training if self.keep_finished_state else 0
        return self.iterations * self.per_iteration() + (self.iterations - 1) * kept + training

    def fits(self) -> bool:
        return self.needed() <= self.free

    def lines(self) -> list[str]:
        g = GIB
        return [
            f"per iteration: model {self.model / g:.2f} GiB × {self.models_per_iteration}, "
            f"data ≤ {self.data / g:.2f} GiB, while training {self.kept_checkpoints} DeepSpeed "
            f"checkpoints × {self.checkpoint / g:.2f} GiB × {self.models_per_iteration}"
            + (
                " (kept after the iteration: training.keep_finished_state)"
                if self.keep_finished_state
                else " (removed once the iteration's model is promoted)"
            ),
            f"whole run ({self.iterations} iterations): about {self.needed() / g:.1f} GiB; "
            f"free where the run directory is ({self.where}): {self.free / g:.1f} GiB",
        ]

    def problem(self) -> str:
        return (
            f"disk: the run needs about {self.needed() / GIB:.1f} GiB but {self.where} has "
            f"{self.free / GIB:.1f} GiB free (fewer run.iterations, training.keep_checkpoints, "
            "or another --run-dir)"
        )


def estimate_disk(cfg: SpinConfig, shape: ModelShape, run_dir: str | Path) -> DiskEstimate:
    """What a run of `cfg` writes: per iteration the exported θ(t+1) (weights in
    `training.export_dtype`), its DeepSpeed checkpoints (weights, and for every trained parameter the fp32
    master copy with bf16 and the optimizer's fp32 tensors; ZeRO shards them over the ranks
    without changing the total) and the Parquet files of its prompts, generations and pairs
    (every token as an int32 id and about 4 bytes of text, in ~5 copies: an upper bound)."""
    import shutil

    training = cfg.training
    bf16 = uses_bf16(cfg)
    weight = 2 if bf16 else 4
    lora = getattr(training, "lora", None)
    trainable = (
        shape.parameters if lora is None else lora_parameters(shape, lora.r, lora.target_modules)
    )
    states = OPTIMIZER_STATES[training.optimizer][1]
    checkpoint = shape.parameters * weight + trainable * (4 * states + (4 if bf16 else 0))
    tokens = cfg.data.num_prompts * (1 + cfg.data.history) * training.max_length
    where = Path(run_dir).resolve()
    probe = next(p for p in (where, *where.parents) if p.exists())
    return DiskEstimate(
        model=shape.parameters * (4 if training.export_dtype == "fp32" else 2),
        checkpoint=checkpoint,
        data=tokens * 8 * 5,
        iterations=cfg.run.iterations,
        kept_checkpoints=training.keep_checkpoints + 1,
        keep_finished_state=training.keep_finished_state,
        models_per_iteration=2 if cfg.run.baseline == "sft" else 1,
        where=probe,
        free=shutil.disk_usage(probe).free,
    )


def _data_section(report: PreflightReport, tokenizer, train, cfg: SpinConfig) -> list[str]:
    """The token lengths of the training data: its lines, and its problems and notes added
    to `report`."""
    try:
        lengths, sample = length_stats(tokenizer, train, cfg)
    except InputError as exc:
        report.problems.append(str(exc))
        return ["", "```", *tokenization_lines(tokenizer, train.iloc[0]), "```"]
    report.lengths = lengths
    problems, notes = length_findings(lengths, cfg)
    report.problems += problems
    report.notes += notes
    return length_lines(tokenizer, sample.iloc[0], lengths, cfg)


def usable_after_dropping(lengths: LengthStats) -> int:
    """Training rows left once the prompts over training.max_prompt_length are dropped."""
    return lengths.rows - round(lengths.prompts_over / lengths.sample * lengths.rows)


def length_findings(lengths: LengthStats, cfg: SpinConfig) -> tuple[list[str], list[str]]:
    """The rules over the token lengths: (problems that stop a run, notes)."""
    training, problems, notes = cfg.training, [], []
    over = lengths.prompts_over / lengths.sample
    if cfg.data.overlong_prompts == "drop":
        usable = usable_after_dropping(lengths)
        if over > 0.5:
            problems.append(
                f"training.max_prompt_length ({training.max_prompt_length}): "
                f"{100 * over:.0f} % of the prompts are longer and would be dropped "
                "(data.overlong_prompts: drop); raise it or use overlong_prompts: truncate"
            )
        elif usable < cfg.data.num_prompts <= lengths.rows:
            estimated = "" if lengths.exact else "about "
            problems.append(
                f"training.max_prompt_length ({training.max_prompt_length}): after dropping "
                f"longer prompts {estimated}{usable} remain, fewer than data.num_prompts "
                f"({cfg.data.num_prompts})"
            )
    elif over > 0.5:
        notes.append(
            f"{100 * over:.0f} % of the prompts are longer than training.max_prompt_length "
            f"({training.max_prompt_length}) and will be left-truncated"
        )
    if lengths.kept and lengths.responses_cut / lengths.kept > 0.5:
        notes.append(
            f"{100 * lengths.responses_cut / lengths.kept:.0f} % of the real responses are cut "
            f"at training.max_length ({training.max_length})"
        )
    if lengths.responses_over_new_tokens / lengths.sample > 0.25:
        notes.append(
            f"{100 * lengths.responses_over_new_tokens / lengths.sample:.0f} % of the real "
            f"responses are longer than generation.max_new_tokens "
            f"({cfg.generation.max_new_tokens}): the opponent's answers are cut there and the "
            "real ones are not, a length cue the model can learn instead of quality"
        )
    if training.max_prompt_length + cfg.generation.max_new_tokens > training.max_length:
        notes.append(
            f"training.max_prompt_length + generation.max_new_tokens "
            f"({training.max_prompt_length} + {cfg.generation.max_new_tokens}) exceeds "
            f"training.max_length ({training.max_length}): long generations are cut in training"
        )
    return problems, notes


def length_lines(tokenizer, row, lengths: LengthStats, cfg: SpinConfig) -> list[str]:
    """The Data section's lines: one row as training sees it, then the token lengths."""
    training = cfg.training
    what = (
        f"all {lengths.rows} training rows"
        if lengths.exact
        else f"a seeded sample of {lengths.sample} of the {lengths.rows} training rows"
    )
    drop = cfg.data.overlong_prompts == "drop"
    lines = [
        "",
        "One row as training sees it:",
        "",
        "```",
        *tokenization_lines(tokenizer, row),
        "```",
        "",
        f"Token lengths ({what}; responses include EOS):",
        "",
        "| | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|",
        "| prompt | " + " | ".join(map(str, lengths.prompt)) + " |",
        "| response (real) | " + " | ".join(map(str, lengths.response)) + " |",
        "",
        f"- prompts longer than training.max_prompt_length ({training.max_prompt_length}): "
        f"{_pct(lengths.prompts_over, lengths.sample)}, "
        + ("dropped (data.overlong_prompts: drop)" if drop else "left-truncated"),
        f"- real responses cut at training.max_length ({training.max_length}) after the "
        f"prompt: {_pct(lengths.responses_cut, lengths.kept)}",
        f"- real responses longer than generation.max_new_tokens "
        f"({cfg.generation.max_new_tokens}): {_pct(lengths.responses_over_new_tokens, lengths.sample)}",
    ]
    if drop:
        estimated = "" if lengths.exact else "about "
        lines.append(
            f"- usable prompts after dropping: {estimated}{usable_after_dropping(lengths)}"
        )
    return lines


def _steps_lines(cfg: SpinConfig, rows: list[StepRow]) -> list[str]:
    training = cfg.training
    total = sum(r.steps * r.count for r in rows)
    lines = [
        f"global batch {training.global_batch_size} pairs = micro-batch "
        f"{training.micro_batch_size} × {training.accumulation_steps()} accumulation × "
        f"{training.num_processes} rank{'s' if training.num_processes > 1 else ''}; "
        f"{training.num_epochs} epoch{'s' if training.num_epochs > 1 else ''} per iteration; "
        f"data.history {cfg.data.history}",
        "",
        "| iteration | training pairs (at most) | steps per epoch | optimizer steps |",
        "|---|---|---|---|",
        *(f"| {r.iterations} | {r.pairs} | {r.steps_per_epoch} | {r.steps} |" for r in rows),
        "",
        f"total over run.iterations ({cfg.run.iterations}): {total} optimizer steps"
        + (" (the SFT baseline trains as many again)" if cfg.run.baseline == "sft" else ""),
        "Upper bounds: iteration t trains on data.num_prompts × (1 + min(data.history, t)) pairs, "
        + (
            "less the pairs whose generated response equals the real one (data.drop_identical)."
            if cfg.data.drop_identical
            else "every pair kept (data.drop_identical: false)."
        ),
    ]
    return lines


def _memory_lines(memory: MemoryEstimate, gpu: float) -> list[str]:
    lines = [
        memory.settings,
        "",
        "| component | GiB | formula (Ψ parameters, s tokens, b sequences, h hidden, L layers) |",
        "|---|---|---|",
    ]
    for row in memory.rows:
        name = row.name if row.in_peak else f"({row.name})"
        lines.append(f"| {name} | {row.bytes / GIB:.2f} | {row.formula} |")
    verdict = "fits" if memory.fits(gpu) else "does NOT fit"
    lines += [
        f"| **peak** | **{memory.peak / GIB:.2f}** | states + max(forward/backward, step) "
        "+ allowance |",
        "",
        f"Model states (weights + gradients + optimizer): {memory.states / GIB:.2f} GiB. "
        f"Peak {memory.peak / GIB:.1f} GiB of {gpu / GIB:g} GiB (--gpu-memory-gib): {verdict}. "
        "Rows in parentheses are not part of the peak. Sequences are taken at training.max_length "
        "(the worst case; batches are padded to their longest pair).",
    ]
    return lines
