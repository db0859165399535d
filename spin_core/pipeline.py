"""The order of a SPIN run, in one place: `run_pipeline` (checks, θ0's evaluation, the
iterations, the report), `run_iteration` (Algorithm 1 of Chen et al. 2024: sample,
generate, build the training set, train, evaluate; with the SFT baseline beside it) and
`after_iteration`, the one rule for what follows an iteration (promote, retry once after a
collapse, or stop), which `spin compare` also reads to know whether a run is finished.

The steps themselves are declared in spin_core/steps.py. A `Runner` executes them:
`spin_core/driver.py` in plain Python, `flows/` as cached Prefect tasks and subflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from spin_core import lm_eval, steps
from spin_core.config import SpinConfig
from spin_core.execution import Step
from spin_core.storage.rundir import RunDir, RunLock, check_config, save_config
from spin_core.training import train

RETRY_LR_SCALE = 0.5  # run.on_collapse=retry_half_lr: the retry's learning-rate factor


class Runner(Protocol):
    """Executes steps (`Step`) and iterations; `spin_core/driver.py` and `flows/` are runners."""

    log: Any

    def step(self, step: Step, *args, **kwargs) -> Any: ...

    def iteration(self, *args, **kwargs) -> dict:
        """`run_iteration` with this runner and these arguments (maybe as a subflow)."""


def run_iteration(
    run: Runner,
    config: SpinConfig,
    run_dir: str,
    iteration: int,
    opponent: str,
    opponent_eval: str,
    lr_scale: float = 1.0,
) -> dict:
    """One SPIN iteration: train θ(t+1) against the opponent θt; returns its metrics.

    opponent_eval: the directory holding θt's held-out evaluation.
    lr_scale: multiplies the learning rate (RETRY_LR_SCALE when retrying a collapse).
    """
    rundir = RunDir(run_dir)
    # 1. Sample the SFT prompts (the same fixed sample every iteration by default).
    run.step(steps.sample_prompts, config, run_dir, iteration)
    # 2. The opponent θt writes y' for every prompt.
    run.step(steps.generate_responses, config, run_dir, iteration, opponent)
    # 3. D_t = {(x, y, y')} with `data.history` earlier iterations.
    run.step(steps.build_training_set, config, run_dir, iteration)
    # 4. Train θ(t+1) from θt on the SPIN loss; θt's log-probs of D_t are scored once,
    #    by the training ranks before their first step (θ(t+1) starts as θt).
    model = run.step(
        steps.train_policy, config, run_dir, iteration, opponent, opponent_eval, lr_scale
    )
    # 5. θ(t+1) is an HF model directory; evaluate it against θt (and decide `collapsed`).
    metrics = run.step(
        steps.evaluate,
        config,
        run_dir,
        model,
        str(rundir.iteration(iteration)),
        opponent_eval,
        iteration,
    )
    if config.run.baseline == "sft":
        # The question users have: does SPIN beat continued SFT with the same steps?
        previous = (
            rundir.base_model(config)
            if iteration == 0
            else str(rundir.baseline_model(iteration - 1))
        )
        baseline = run.step(steps.train_sft_baseline, config, run_dir, iteration, previous)
        run.step(steps.evaluate, config, run_dir, baseline, str(rundir.baseline(iteration)))
    return metrics


@dataclass(frozen=True)
class Decision:
    """What the pipeline does after an iteration (`after_iteration`)."""

    action: str  # "promote", "retry" (once, at RETRY_LR_SCALE) or "stop"
    reason: str = ""
    promote: bool = False  # with "stop": θ(t+1) is still the new opponent (early stop)


def after_iteration(config: SpinConfig, run: RunDir, iteration: int, metrics: dict) -> Decision:
    """The collapse / retry / early-stop policy (`run.on_collapse`, `run.promote_collapsed`,
    `run.early_stop_margin`) after iteration `iteration` with these metrics (its
    metrics.json): the one home of the rule, read by `run_pipeline` and by `spin compare`
    (`compare.is_finished`)."""
    if metrics.get("collapsed"):
        loglik = (
            f"held-out real log-likelihood {metrics['real_loglik_per_token']:.4f} "
            f"vs opponent {metrics['opponent_real_loglik_per_token']:.4f}"
        )
        if config.run.on_collapse == "retry_half_lr" and not run.retry(iteration).exists():
            return Decision(
                "retry",
                f"iteration {iteration} collapsed ({loglik}); retrying once at "
                f"{RETRY_LR_SCALE}× the learning rate, the attempt kept in "
                f"{run.collapsed_attempt(iteration)}",
            )
        if not config.run.promote_collapsed:
            return Decision(
                "stop",
                f"iteration {iteration} collapsed: {loglik} (tolerance "
                f"{config.run.collapse_tolerance:.2f}); θ{iteration + 1} is not promoted and "
                "the run stops",
            )
    margin = config.run.early_stop_margin
    if margin is not None and metrics.get("margin") is not None and metrics["margin"] < margin:
        return Decision(
            "stop",
            f"held-out margin {metrics['margin']:.4f} < early_stop_margin {margin:.4f}: "
            f"stopping after iteration {iteration}",
            promote=True,
        )
    return Decision("promote")


def run_lm_eval(
    run: Runner,
    config: SpinConfig,
    run_dir: str,
    model: str,
    out_dir: str,
    iteration: int | None = None,
) -> dict | None:
    """The lm-eval step when `eval.lm_eval.tasks` is set; None (nothing runs) otherwise."""
    if not lm_eval.enabled(config.eval.lm_eval):
        return None
    return run.step(steps.lm_eval_model, config, run_dir, model, out_dir, iteration)


def run_pipeline(run: Runner, config: SpinConfig, run_dir: str) -> str:
    """θ0 → θ1 → ... → θT (`run.iterations`); returns the path of report.md.

    Rerunning on the same run directory resumes: finished steps are not redone.
    """
    rundir = RunDir(run_dir)
    run_dir = str(rundir.root)
    with RunLock(rundir):
        check_config(rundir, config)
        train.use_deterministic(config.run.deterministic)  # before any GPU work here
        if config.uses_toy():
            run.step(steps.check_own_inputs, config, run_dir)  # before minutes of toy build
            run.step(steps.build_embedded_default, config, run_dir)
        # Data and model are checked before anything is written for the run, so a
        # corrected rerun is not refused as a changed config.
        run.step(steps.check_inputs, config, run_dir)
        save_config(rundir, config)
        opponent, opponent_eval = rundir.base_model(config), str(rundir.theta0())
        run.step(steps.evaluate, config, run_dir, opponent, opponent_eval)
        run_lm_eval(run, config, run_dir, opponent, opponent_eval)
        run.step(steps.track_experiment, config, run_dir)
        for t in range(config.run.iterations):
            args = (config, run_dir, t, opponent, opponent_eval)
            metrics = run.iteration(*args, lr_scale=rundir.lr_scale(t))
            decision = after_iteration(config, rundir, t, metrics)
            if decision.action == "retry":
                run.log.warning(decision.reason)
                rundir.archive_collapsed(t, lr_scale=RETRY_LR_SCALE)
                metrics = run.iteration(*args, lr_scale=rundir.lr_scale(t))
                decision = after_iteration(config, rundir, t, metrics)
            if decision.action == "stop" and not decision.promote:
                run.log.warning(decision.reason)
                break
            opponent, opponent_eval = metrics["model"], str(rundir.iteration(t))
            if not config.training.keep_finished_state:
                removed = rundir.remove_checkpoints(t)  # θ(t+1) is exported: no resume needed
                if removed:
                    run.log.info("iteration %d: removed %d checkpoints", t, len(removed))
            # θ(t+1) is promoted: benchmark it (a collapsed, unpromoted model is not)
            run_lm_eval(run, config, run_dir, opponent, opponent_eval, t)
            run.step(steps.track_experiment, config, run_dir)
            if decision.action == "stop":
                run.log.info(decision.reason)
                break
        path = run.step(steps.write_report, config, run_dir)
        run.step(steps.track_experiment, config, run_dir)
        return path
