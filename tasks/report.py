"""After the last iteration: metrics.parquet, report.md, and the same tables as Prefect artifacts."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from spin_core import report
from spin_core.config import SpinConfig
from spin_core.rundir import RunDir
from tasks.progress import logger


@task(name="write-report", cache_policy=NO_CACHE)
def write_report(config: SpinConfig, run_dir: str) -> str:
    path, metrics = report.write_report(run_dir, sample_rows=config.run.sample_rows)
    if len(metrics):
        columns = ["model_name"] + [key for key, _ in report.COLUMNS if key in metrics]
        table = metrics[columns].astype(object).where(metrics[columns].notna(), None)
        create_table_artifact(
            table=table.to_dict(orient="records"),
            key="spin-metrics",
            description="held-out metrics per model",
        )
    create_markdown_artifact(markdown=path.read_text(), key="spin-report", description=str(path))
    logger().info("report written to %s", path)
    return str(path)


@task(name="track-experiment", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def track_experiment(config: SpinConfig, run_dir: str) -> None:
    """Copy what is new in the run directory to MLflow or W&B (`run.tracking`); else nothing."""
    if config.run.tracking == "none":
        return
    from spin_core import tracking

    params = tracking.config_params(config.model_dump(mode="json"))
    if config.run.tracking == "wandb":
        state = tracking.track_wandb(RunDir(run_dir), params)
        logger().info("W&B (%s): logged %s", state["mode"], state["logged"])
        return
    state = tracking.track(RunDir(run_dir), params)
    logger().info("MLflow run %s at %s: logged %s", state["parent"], state["uri"], state["logged"])
