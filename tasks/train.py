"""Step 4: train θ(t+1) from θt with DeepSpeed; resumes from train_state/."""

from __future__ import annotations

from pathlib import Path

from spin_core import launch, train
from spin_core.checkpoint import is_model_dir
from spin_core.config import SpinConfig
from spin_core.rundir import RunDir
from tasks.caching import step
from tasks.progress import Progress, logger


def _inputs(params: dict) -> list:
    return [RunDir(params["run_dir"]).pairs(params["iteration"]), params["opponent"]]


def _load(params: dict) -> str:
    return str(RunDir(params["run_dir"]).model(params["iteration"]))


def _done(params: dict) -> bool:
    return is_model_dir(RunDir(params["run_dir"]).model(params["iteration"]))


@step("train-policy", sections=("model", "training"), inputs=_inputs, done=_done, load=_load)
def train_policy(
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
    out = run.model(iteration)
    progress = Progress(f"train-iter-{iteration}", f"iteration {iteration}: optimizer steps")
    run_training(
        config,
        progress,
        init_model=opponent,
        train_path=run.pairs(iteration),
        scored_path=run.train(iteration),
        state_dir=run.train_state(iteration),
        model_out=out,
        iteration=iteration,
        opponent_eval=opponent_eval,
        lr_scale=lr_scale,
    )
    return str(out)


def run_training(config: SpinConfig, progress: Progress, *, opponent_eval=None, **kwargs) -> None:
    """`train_iteration` in this process, or on `num_processes` ranks launched as a group.

    kwargs: train_iteration's arguments other than cfg, on_step and health.
    opponent_eval: θt's evaluation directory, for the health check during training.
    """
    log = logger()
    iteration = kwargs["iteration"]
    eval_file = str(Path(opponent_eval) / "eval.parquet") if opponent_eval else None
    use_health = bool(config.training.eval_steps and eval_file)

    def on_step(record: dict) -> None:
        progress.update(record["step"], record["total_steps"])
        log.info(
            "iter %d step %d/%d loss %.4f margin %.3f acc %s lr %.2e %.0f tok/s",
            iteration,
            record["step"],
            record["total_steps"],
            record["loss"],
            record["margin"],
            "–" if record["reward_accuracy"] is None else f"{record['reward_accuracy']:.2f}",
            record["learning_rate"],
            record["tokens_per_s"],
        )
        if "heldout_real_loglik" in record:
            log.info(
                "iter %d step %d: held-out real log-lik %.4f nats/token (%s)",
                iteration,
                record["step"],
                record["heldout_real_loglik"],
                "healthy" if record["healthy"] else "BELOW the opponent's by more than tolerance",
            )

    training = config.training
    if training.num_processes > 1 or training.hostfile:
        args = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
        args |= {"config": config.model_dump(mode="json"), "opponent_eval": eval_file}
        log.info(
            "iteration %d: launching %d training ranks (ZeRO-%d)",
            iteration,
            training.num_processes,
            training.zero_stage,
        )
        launch.launch_training(args, training, on_step=on_step, on_log=log.info)
        return
    health = train.health_probe(config, kwargs["init_model"], eval_file) if use_health else None
    result = train.train_iteration(cfg=config, on_step=on_step, health=health, **kwargs)
    if result.resumed_from:
        log.info("iteration %d: resumed training from step %d", iteration, result.resumed_from)
