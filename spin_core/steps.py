"""The SPIN pipeline's steps, each defined once (the order they run in is
spin_core/pipeline.py).

Algorithm 1 of Chen et al. (2024), one iteration θt → θ(t+1) (`pipeline.run_iteration`):

1. `sample_prompts`: the SFT (prompt, real) pairs of the iteration, tokenized once;
2. `generate_responses`: the opponent θt writes y' for every prompt;
3. `build_training_set`: D_t = {(x, y, y')}, with `data.history` earlier iterations;
4. `train_policy`: θ(t+1) from θt on the SPIN loss (θt's log-probs are scored by the
   training ranks before their first step);
5. `evaluate`: θ(t+1)'s held-out metrics against θt, and the collapse decision.

Each step is a `spin_core.execution.Step`: its inputs, outputs and body declared together.
A runner executes them: `spin_core/driver.py` in plain Python (benchmarks, notebooks),
`flows/` as cached Prefect tasks and flows, or on GPU workers. docs/DESIGN.md has
the run directory layout and the step table.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from spin_core import data, generation, lm_eval, toy
from spin_core.config import TOY, DataConfig, SpinConfig, schedule_at
from spin_core.evaluate import collapsed, evaluate_model, evaluation_config
from spin_core.execution import Context, Output, Params, at_iteration, step
from spin_core.generation import Generated
from spin_core.generation.workers import in_process
from spin_core.prompts import drop_overlong_prompts, encode_pairs
from spin_core.reports import report, tracking
from spin_core.runtime.devices import check_device_counts, compute_dtype, release_memory
from spin_core.storage import provenance
from spin_core.storage.files import (
    atomic_path,
    parquet_complete,
    parquet_rows,
    read_parquet_checked,
    write_json_atomic,
    write_parquet_atomic,
)
from spin_core.storage.models import check_causal_lm, load_policy, pinned_model
from spin_core.storage.models import load_tokenizer as _load_tokenizer
from spin_core.storage.rundir import EvalDir, RunDir, RunLock, check_config
from spin_core.training import train
from spin_core.training.job import TrainJob
from spin_core.training.state import training_summary


def _run(params: Params) -> RunDir:
    return RunDir(params["run_dir"])


def _tokenizer(config: SpinConfig, model: str):
    return _load_tokenizer(model, trust_remote_code=config.model.trust_remote_code)


# ------------------------------------------------------------------ before iteration 0


def _check_model_data(
    config: SpinConfig, model: str | None, data_config: DataConfig | None
) -> tuple[pd.DataFrame, pd.DataFrame, dict] | None:
    """The checks shared by both input checks: (training pairs, held-out pairs, stats) of
    `data_config`, None without one."""
    tracking.check_available(config)
    tokenizer = None
    if model is not None:
        check_causal_lm(model, trust_remote_code=config.model.trust_remote_code)
        tokenizer = _tokenizer(config, model)
    if config.run.execution == "local":  # with deployments, the GPU workers have the backend
        generation.check_backend_available(config)
    if data_config is None:
        return None
    train_pairs, heldout, stats = data.load_sft_data(data_config)
    # Raises, naming data.num_prompts, when the data holds fewer usable rows.
    data.sample_prompts(train_pairs, config.data.num_prompts, seed=config.data.seed)
    if tokenizer is not None:
        # Raises, naming the tokenizer, when its template cannot split prompt from response.
        encode_pairs(tokenizer, train_pairs.head(8), config.training.max_prompt_length)
    return train_pairs, heldout, stats


_checked: dict[str, tuple] = {}  # _check_model_data's result, by what it depends on


def _checked_model_data(config: SpinConfig, model: str | None, data_config: DataConfig | None):
    """`_check_model_data`, done once per process for the same inputs (the command line
    checks before the orchestrator starts; the flow's own check then reuses the result)."""
    dataset = Path(data_config.dataset) if data_config is not None else None
    stat = dataset.stat() if dataset is not None and dataset.is_file() else None
    key = json.dumps(
        [
            config.model_dump(mode="json"),
            model,
            data_config.model_dump(mode="json") if data_config is not None else None,
            [stat.st_size, stat.st_mtime_ns] if stat else None,
        ],
        sort_keys=True,
    )
    if key not in _checked:
        _checked.clear()
        _checked[key] = (_check_model_data(config, model, data_config),)
    return _checked[key][0]


def check_before_start(config: SpinConfig, run_dir: str) -> None:
    """Every check of the user's inputs, in seconds, writing nothing: the run directory's
    lock and saved config, then the dataset, model, tokenizer and template (the user's own
    when the other is the embedded default). Raises InputError naming the field or file."""
    rundir = RunDir(run_dir)
    RunLock(rundir).check()
    check_config(rundir, config)
    if config.run.execution == "local":  # with deployments, the GPU machines are elsewhere
        for warning in check_device_counts(config):
            logging.getLogger("spin").warning(warning)
    if config.uses_toy() and not (rundir.toy / toy.MARKER).is_file():
        _check_own(config)
    else:
        _checked_model_data(config, rundir.base_model(config), rundir.data_config(config))


@step("check-own-inputs", journaled=False)
def check_own_inputs(ctx: Context, config: SpinConfig, run_dir: str) -> None:
    """The user's own inputs, checked before the embedded default is built.

    With one input the embedded default and the other the user's (a missing
    dataset with the toy model, a missing model with the toy data), the mistake is
    reported in seconds, before minutes of SFT warm-up and before anything is
    written into the run directory.
    """
    _check_own(config)


def _check_own(config: SpinConfig) -> None:
    """The user's inputs beside an embedded default that is not built yet: its base model
    (`toy.base_model`), and the user's own model or dataset."""
    model = None
    if config.model.name_or_path != TOY:
        model = pinned_model(config.model.name_or_path, config.model.revision)
    if config.uses_toy() and config.toy.base_model is not None:
        check_causal_lm(config.toy.base_model, field="toy.base_model")
    _checked_model_data(config, model, None if config.data.dataset == TOY else config.data)


@step("build-embedded-default", journaled=False)
def build_embedded_default(ctx: Context, config: SpinConfig, run_dir: str) -> str:
    """The toy data and the weak SFT model θ0 (docs/DESIGN.md §6); kept once built."""
    artifacts = toy.build_from_config(RunDir(run_dir).toy, config.toy)
    ctx.log.info("embedded default ready: θ0 at %s", artifacts.model_dir)
    return str(artifacts.model_dir)


@step("check-inputs", retries=2, journaled=False)
def check_inputs(ctx: Context, config: SpinConfig, run_dir: str) -> str:
    """Refuse bad data or model paths before heavy work; write heldout.parquet (id, prompt, real)."""
    run = RunDir(run_dir)
    train_pairs, heldout, stats = _checked_model_data(
        config, run.base_model(config), run.data_config(config)
    )
    ctx.log.info("data: %d training pairs, %d held out (%s)", len(train_pairs), len(heldout), stats)
    if read_parquet_checked(run.heldout) is None:
        columns = [c for c in [*data.PAIR_COLUMNS, *data.OPTIONAL_COLUMNS] if c in heldout]
        write_parquet_atomic(heldout[columns], run.heldout)
    return str(run.heldout)


# ------------------------------------------------------------- 1. sample the prompts


def _dataset(params: Params) -> list:
    dataset = _run(params).dataset(params["config"])
    return [dataset] if Path(dataset).exists() else []


@step(
    "sample-prompts",
    sections=("data", "model", "toy", "training"),
    inputs=_dataset,
    outputs=(Output(at_iteration(RunDir.prompts), "parquet"),),
    retries=2,
)
def sample_prompts(ctx: Context, config: SpinConfig, run_dir: str, iteration: int) -> str:
    """SFT data → iter_t/prompts.parquet (id, prompt, real, prompt_ids, real_ids); seeded,
    the same every iteration unless data.resample_each_iteration."""
    run = RunDir(run_dir)
    first = run.prompts(0)
    if iteration > 0 and not config.data.resample_each_iteration and parquet_complete(first):
        # The paper's fixed sample: iteration 0 drew and tokenized these very rows.
        with atomic_path(run.prompts(iteration)) as tmp:
            shutil.copyfile(first, tmp)
        ctx.log.info("iteration %d: the fixed sample of iteration 0, reused", iteration)
        return str(run.prompts(iteration))
    train_pairs, _, stats = data.load_sft_data(run.data_config(config))
    tokenizer = _tokenizer(config, run.base_model(config))
    max_prompt = config.training.max_prompt_length
    if config.data.overlong_prompts == "drop":
        train_pairs, dropped = drop_overlong_prompts(train_pairs, tokenizer, max_prompt)
        ctx.log.info("dropped %d prompts longer than %d tokens", dropped, max_prompt)
    sample = data.sample_prompts(
        train_pairs,
        config.data.num_prompts,
        seed=config.data.seed,
        iteration=iteration,
        resample=config.data.resample_each_iteration,
    )
    ctx.log.info(
        "iteration %d: sampled %d of %d pairs (%s)", iteration, len(sample), len(train_pairs), stats
    )
    # Tokenized once, here, as the SFT trainer tokenized the chat; later steps use these ids.
    prompt_ids, real_ids = encode_pairs(tokenizer, sample, max_prompt)
    sample = sample.assign(prompt_ids=prompt_ids, real_ids=real_ids)
    return str(write_parquet_atomic(sample, run.prompts(iteration)))


# ------------------------------------------------------ 2. the opponent's responses


def _prompt_rows(params: Params) -> int | None:
    return parquet_rows(_run(params).prompts(params["iteration"]))


@step(
    "generate-responses",
    sections=("generation", "model", "training"),
    inputs=lambda p: [_run(p).prompts(p["iteration"]), p["opponent"]],
    outputs=(Output(at_iteration(RunDir.generated), "parquet", rows=_prompt_rows),),
)
def generate_responses(
    ctx: Context, config: SpinConfig, run_dir: str, iteration: int, opponent: str
) -> str:
    """prompts.parquet + θt → generated/part-*.parquet → generated.parquet.

    `generation.num_workers` worker processes (one device each) claim shards as they go;
    finished shards are kept, so a crash costs at most one shard per worker.
    """
    run = RunDir(run_dir)
    rows = parquet_rows(run.prompts(iteration))
    shards = run.generated_shards(iteration)
    size = config.generation.shard_size
    finished = rows - sum(
        min(size, rows - k * size) for k in generation.missing_shards(shards, rows, size)
    )
    progress = ctx.progress(f"generate-iter-{iteration}", f"iteration {iteration}: responses")
    bar = tqdm(total=rows, initial=finished, desc="generate", unit="prompt")

    def on_rows(count: int) -> None:
        bar.update(count)
        progress.update(bar.n, rows)

    try:
        generation.generate(
            opponent, config, run.prompts(iteration), shards, on_rows=on_rows, on_log=ctx.log.info
        )
    finally:
        bar.close()
    return merge_generated(ctx.log, config, run_dir, iteration)


def merge_generated(log, config: SpinConfig, run_dir: str, iteration: int) -> str:
    """The finished shards → iter_t/generated.parquet, in prompt order."""
    run = RunDir(run_dir)
    rows = parquet_rows(run.prompts(iteration))
    out = run.generated(iteration)
    generation.merge_shards(
        run.generated_shards(iteration), rows, config.generation.shard_size, out
    )
    finished = pd.read_parquet(out, columns=["finish_reason"])["finish_reason"]
    log.info(
        "iteration %d: %d responses, %.1f%% stopped at EOS",
        iteration,
        len(finished),
        100 * (finished == "stop").mean(),
    )
    return str(out)


# ---------------------------------------------------------- 3. the training set D_t


def history_window(config: SpinConfig, iteration: int) -> range:
    """The iterations whose generations form D_t: t and `data.history` before it."""
    return range(max(0, iteration - config.data.history), iteration + 1)


@step(
    "build-training-set",
    sections=("data",),
    inputs=lambda p: [_run(p).generated(s) for s in history_window(p["config"], p["iteration"])],
    outputs=(
        Output(at_iteration(RunDir.pairs_counts), "json"),
        Output(at_iteration(RunDir.pairs), "parquet"),
    ),
)
def build_training_set(ctx: Context, config: SpinConfig, run_dir: str, iteration: int) -> dict:
    """generated.parquet of t, t-1, ... → iter_t/pairs.parquet; returns the counts."""
    run = RunDir(run_dir)
    sources = history_window(config, iteration)
    generated = {t: pd.read_parquet(run.generated(t)) for t in sources}
    pairs, stats = data.build_training_set(generated, drop_identical=config.data.drop_identical)
    write_parquet_atomic(pairs, run.pairs(iteration))
    counts = {
        "train_pairs": stats.rows,
        "identical_dropped": stats.identical_dropped,
        "identical_fraction": stats.identical_fraction,
    }
    write_json_atomic(counts, run.pairs_counts(iteration))
    ctx.log.info(
        "iteration %d: %d training pairs from iterations %s; %d identical pairs dropped (%.1f%%)",
        iteration,
        stats.rows,
        list(sources),
        stats.identical_dropped,
        100 * stats.identical_fraction,
    )
    return counts


# ------------------------------------------------------------------- 4. train θ(t+1)


@step(
    "train-policy",
    sections=("model", "training"),
    inputs=lambda p: [_run(p).pairs(p["iteration"]), p["opponent"]],
    outputs=(Output(at_iteration(RunDir.model), "model"),),
)
def train_policy(
    ctx: Context,
    config: SpinConfig,
    run_dir: str,
    iteration: int,
    opponent: str,
    opponent_eval: str | None = None,
    lr_scale: float = 1.0,
) -> str:
    """pairs.parquet + θt → train.parquet (θt's log-probs, scored by the training ranks
    before their first step) → train_state/ (checkpoints, metrics.jsonl) → model/ (θ(t+1)).

    opponent_eval: the directory of θt's held-out evaluation; with
    `training.eval_steps` set, the held-out real log-likelihood is checked against
    it during training. lr_scale: multiplies the learning rate (collapse retry).
    """
    run = RunDir(run_dir)
    job = TrainJob(
        init_model=opponent,
        train_path=run.pairs(iteration),
        scored_path=run.train(iteration),
        state_dir=run.train_state(iteration),
        model_out=run.model(iteration),
        iteration=iteration,
        opponent_eval_file=str(EvalDir(opponent_eval).eval) if opponent_eval else None,
        lr_scale=lr_scale,
    )
    progress = ctx.progress(f"train-iter-{iteration}", f"iteration {iteration}: optimizer steps")
    _train(ctx, config, progress, job)
    return str(run.model(iteration))


def _train(ctx: Context, config: SpinConfig, progress, job: TrainJob) -> None:
    """`train.run_rank(job)` in this process, or on `num_processes` ranks launched as a group."""
    from spin_core.training import launch

    iteration = job.iteration

    def on_step(record: dict) -> None:
        progress.update(record["step"], record["total_steps"])
        for line in train.step_lines(record):
            ctx.log.info(line)

    training = config.training
    if training.num_processes > 1 or training.hostfile:
        ctx.log.info(
            "iteration %d: launching %d training ranks (ZeRO-%d)",
            iteration,
            training.num_processes,
            training.zero_stage,
        )
        launch.launch_training(config, job, on_step=on_step, on_log=ctx.log.info)
        return
    result = train.run_rank(config, job, on_step=on_step, on_phase=ctx.phase)
    if result.resumed_from:
        ctx.log.info("iteration %d: resumed training from step %d", iteration, result.resumed_from)


# ------------------------------------------------------------------- 5. evaluate


def _eval_inputs(params: Params) -> list:
    run = _run(params)
    files = [run.heldout, params["model"]]
    if params.get("opponent_dir"):
        files.append(EvalDir(params["opponent_dir"]).eval)
    if params.get("iteration") is not None:
        t = params["iteration"]
        files += [run.pairs_counts(t), run.step_log(t)]
    return files


def _generate_heldout(
    ctx: Context, config: SpinConfig, model: str, heldout: pd.DataFrame, out: EvalDir
) -> list[Generated]:
    """The greedy answers of `model` to the held-out prompts, written by the generation
    workers (`generation.num_workers` processes, the configured backend) as generation's
    are: shards under out/eval_generated/, kept across a crash, removed once merged."""
    cfg = evaluation_config(config)
    tokenizer = _load_tokenizer(model, trust_remote_code=config.model.trust_remote_code)
    prompt_ids, _ = encode_pairs(tokenizer, heldout, config.training.max_prompt_length)
    shards, prompts = out.root / "eval_generated", out.root / "eval_generated" / "prompts.parquet"
    shards.mkdir(parents=True, exist_ok=True)
    if not parquet_complete(prompts):
        write_parquet_atomic(pd.DataFrame({"prompt_ids": prompt_ids}), prompts)
    generation.generate(model, cfg, prompts, shards, on_log=ctx.log.info)
    merged = generation.merge_shards(
        shards, len(heldout), cfg.generation.shard_size, shards / "merged.parquet"
    )
    frame = pd.read_parquet(merged, columns=["generated", "finish_reason", "generated_ids"])
    shutil.rmtree(shards, ignore_errors=True)
    return [
        Generated(text=text, finish_reason=reason, token_ids=[int(t) for t in ids])
        for text, reason, ids in frame.itertuples(index=False)
    ]


@step(
    "evaluate-model",
    sections=("eval", "generation", "model", "training", "run"),
    inputs=_eval_inputs,
    outputs=(
        Output(lambda p: EvalDir(p["out_dir"]).metrics, "json"),
        Output(lambda p: EvalDir(p["out_dir"]).eval, "parquet"),
    ),
)
def evaluate(
    ctx: Context,
    config: SpinConfig,
    run_dir: str,
    model: str,
    out_dir: str,
    opponent_dir: str | None = None,
    iteration: int | None = None,
) -> dict:
    """model + heldout.parquet → out_dir/eval.parquet and out_dir/metrics.json.

    opponent_dir: where the opponent's own evaluation lives; its generations are the
    held-out y' for reward accuracy and margin. With `iteration`, the metrics also
    hold the training summary and `collapsed` (docs/DESIGN.md §5).
    """
    run, out = RunDir(run_dir), EvalDir(out_dir)
    heldout = pd.read_parquet(run.heldout)
    opponent_frame = pd.read_parquet(EvalDir(opponent_dir).eval) if opponent_dir else None
    generated = None
    if not in_process(config):  # the machine's generation workers, then scoring
        generated = _generate_heldout(ctx, config, model, heldout, out)
    policy, tokenizer = load_policy(model, config.model)
    frame, metrics = evaluate_model(
        policy,
        tokenizer,
        heldout,
        config,
        opponent_frame=opponent_frame,
        beta=schedule_at(config.training.beta, iteration or 0),
        group_of=toy.task_grouping(heldout),
        show_progress=True,
        generated=generated,
    )
    del policy  # the next step (vLLM generation, training) needs this process's GPU memory
    release_memory()
    write_parquet_atomic(frame, out.eval)
    metrics["model"] = model
    metrics |= provenance.record(config.generation.backend, model)
    if iteration is not None:
        metrics |= training_summary(run, iteration)
        # The health signal: real responses must not become less likely.
        metrics["collapsed"] = collapsed(
            metrics["real_loglik_per_token"],
            metrics["opponent_real_loglik_per_token"],
            config.run.collapse_tolerance,
        )
    write_json_atomic(metrics, out.metrics)
    ctx.log.info(
        "%s: exact match %.3f, real log-lik %.4f nats/token%s",
        model,
        metrics["exact_match"],
        metrics["real_loglik_per_token"],
        f", margin {metrics['margin']:.3f}" if "margin" in metrics else "",
    )
    return metrics


# ------------------------------------------------------------ the comparison baseline


@step(
    "train-sft-baseline",
    sections=("model", "training"),
    inputs=lambda p: [
        _run(p).prompts(p["iteration"]),
        _run(p).iteration_metrics(p["iteration"]),
        p["previous"],
    ],
    outputs=(Output(at_iteration(RunDir.baseline_model), "model"),),
)
def train_sft_baseline(
    ctx: Context, config: SpinConfig, run_dir: str, iteration: int, previous: str
) -> str:
    """prompts.parquet (real responses) + the previous baseline → iter_t/baseline/model.

    Continued SFT with the same steps and learning rate as SPIN's iteration.
    """
    run = RunDir(run_dir)
    out = run.baseline_model(iteration)
    spin_steps = json.loads(run.iteration_metrics(iteration).read_text())["train_steps"]
    job = TrainJob(
        init_model=previous,
        train_path=run.prompts(iteration),
        state_dir=run.baseline_state(iteration),
        model_out=out,
        iteration=iteration,
        objective="sft",
        num_steps=spin_steps,
    )
    progress = ctx.progress(
        f"baseline-iter-{iteration}", f"iteration {iteration}: SFT baseline steps"
    )
    _train(ctx, config, progress, job)
    ctx.log.info("iteration %d: SFT baseline trained for %d steps", iteration, spin_steps)
    return str(out)


# ------------------------------------------------------------------- lm-eval, report


def _lm_eval_inputs(params: Params) -> list:
    settings = params["config"].eval.lm_eval
    files = [Path(params["model"])]
    if settings is not None and settings.include_path:
        files.append(Path(settings.include_path))  # custom task YAMLs and their data
    return files


def _lm_eval_done(params: Params) -> bool:
    settings = params["config"].eval.lm_eval
    return settings is not None and lm_eval.read_result(params["out_dir"], settings) is not None


def _lm_eval_summary(result: dict) -> dict:
    return {key: result[key] for key in ("model", "lm_eval_version", "scores")}


@step(
    "lm-eval",
    sections=("model",),
    inputs=_lm_eval_inputs,
    done=_lm_eval_done,
    load=lambda p: _lm_eval_summary(lm_eval.read_result(p["out_dir"], p["config"].eval.lm_eval)),
)
def lm_eval_model(
    ctx: Context,
    config: SpinConfig,
    run_dir: str,
    model: str,
    out_dir: str,
    iteration: int | None = None,
) -> dict:
    """model → out_dir/lm_eval.json (`eval.lm_eval`); returns {model, lm_eval_version, scores}.

    iteration: t for θ(t+1) (the journal's iteration), None for θ0.
    """
    settings = config.eval.lm_eval
    dtype = str(compute_dtype(config.model.precision)).removeprefix("torch.")
    result = lm_eval.run(
        model,
        settings,
        out_dir,
        dtype=dtype,
        trust_remote_code=config.model.trust_remote_code,
        on_line=ctx.log.info,
    )
    rows = lm_eval.table(result)
    name = "θ0" if iteration is None else f"θ{iteration + 1}"
    ctx.table(
        "lm-eval-theta0" if iteration is None else f"lm-eval-theta{iteration + 1}",
        rows,
        f"lm-evaluation-harness {result['lm_eval_version']} scores of {name}",
    )
    ctx.log.info(
        "%s: lm-eval %s in %.0f s (%d process(es)): %s",
        model,
        result["lm_eval_version"],
        result["seconds"],
        result.get("processes", 1),
        ", ".join(f"{row['task']} {row['metric']} {row['value']:.4f}" for row in rows),
    )
    return _lm_eval_summary(result)


@step("write-report", journaled=False)
def write_report(ctx: Context, config: SpinConfig, run_dir: str) -> str:
    """metrics.parquet, report.md and plots, and the same tables as artifacts."""
    path, metrics = report.write_report(run_dir, sample_rows=config.run.sample_rows)
    if len(metrics):
        columns = ["model_name"] + [key for key, _ in report.COLUMNS if key in metrics]
        table = metrics[columns].astype(object).where(metrics[columns].notna(), None)
        ctx.table("spin-metrics", table.to_dict(orient="records"), "held-out metrics per model")
    ctx.markdown("spin-report", report.embed_images(path.read_text(), path.parent), str(path))
    ctx.log.info("report written to %s", path)
    return str(path)


@step("track-experiment", retries=2, journaled=False)
def track_experiment(ctx: Context, config: SpinConfig, run_dir: str) -> None:
    """Copy what is new in the run directory to MLflow or W&B (`run.tracking`); else nothing."""
    if config.run.tracking == "none":
        return
    from spin_core.reports import tracking

    params = tracking.config_params(config.model_dump(mode="json"))
    if config.run.tracking == "wandb":
        state = tracking.track_wandb(RunDir(run_dir), params)
        ctx.log.info("W&B (%s): logged %s", state["mode"], state["logged"])
        return
    state = tracking.track(RunDir(run_dir), params)
    ctx.log.info("MLflow run %s at %s: logged %s", state["parent"], state["uri"], state["logged"])
