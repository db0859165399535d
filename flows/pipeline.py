"""The SPIN pipeline: θ0 → θ1 → ... → θT, each iteration a subflow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.iteration import spin_iteration
from spin_core.config import SpinConfig
from spin_core.rundir import RunDir, RunLock, check_config, save_config
from tasks.evaluate import evaluate
from tasks.lm_eval import run_lm_eval
from tasks.prepare import build_embedded_default, check_inputs, check_own_inputs
from tasks.report import track_experiment, write_report


def default_run_dir(config: SpinConfig) -> str:
    return str(Path("runs") / config.run.name)


@flow(name="spin-pipeline", log_prints=True)
def spin_pipeline(config: SpinConfig, run_dir: str | None = None) -> str:
    """Run `config.run.iterations` SPIN iterations; returns the path of report.md.

    Rerunning on the same run directory resumes: finished steps are skipped.
    """
    log = get_run_logger()
    run = RunDir(run_dir or default_run_dir(config))
    with RunLock(run):
        check_config(run, config)
        if config.uses_toy():
            check_own_inputs(config)  # the user's half of the inputs, before minutes of toy build
            build_embedded_default(config, str(run.root))
        # Data and model are checked before anything is written for the run, so a
        # corrected rerun is not refused as a changed config.
        check_inputs(config, str(run.root))
        save_config(run, config)
        opponent, opponent_eval = run.base_model(config), str(run.base_eval())
        evaluate(config, str(run.root), opponent, opponent_eval)
        run_lm_eval(config, str(run.root), opponent, opponent_eval)  # eval.lm_eval benchmarks
        track_experiment(config, str(run.root))
        for iteration in range(config.run.iterations):
            args = (config, str(run.root), iteration, opponent, opponent_eval)
            metrics = spin_iteration(*args, lr_scale=run.lr_scale(iteration))
            if (
                metrics.get("collapsed")
                and config.run.on_collapse == "retry_half_lr"
                and not run.retry(iteration).exists()
            ):
                log.warning(
                    "iteration %d collapsed (held-out real log-likelihood %.4f vs opponent %.4f); "
                    "retrying once at half the learning rate, the attempt kept in %s",
                    iteration,
                    metrics["real_loglik_per_token"],
                    metrics["opponent_real_loglik_per_token"],
                    run.collapsed_attempt(iteration),
                )
                run.archive_collapsed(iteration, lr_scale=0.5)
                metrics = spin_iteration(*args, lr_scale=run.lr_scale(iteration))
            if metrics.get("collapsed") and not config.run.promote_collapsed:
                log.warning(
                    "iteration %d collapsed: held-out real log-likelihood %.4f vs opponent %.4f "
                    "(tolerance %.2f); θ%d is not promoted and the run stops",
                    iteration,
                    metrics["real_loglik_per_token"],
                    metrics["opponent_real_loglik_per_token"],
                    config.run.collapse_tolerance,
                    iteration + 1,
                )
                break
            opponent, opponent_eval = metrics["model"], str(run.iteration(iteration))
            # θ(t+1) is promoted: benchmark it (a collapsed, unpromoted model is not)
            run_lm_eval(config, str(run.root), opponent, opponent_eval, iteration)
            track_experiment(config, str(run.root))
            stop_margin = config.run.early_stop_margin
            if stop_margin is not None and metrics["margin"] < stop_margin:
                log.info(
                    "held-out margin %.4f < early_stop_margin %.4f: stopping after iteration %d",
                    metrics["margin"],
                    stop_margin,
                    iteration,
                )
                break
        report = write_report(config, str(run.root))
        track_experiment(config, str(run.root))
        return report
