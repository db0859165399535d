"""What every benchmark shares: the cached toy θ0, the real chat model (`--model smollm2`:
SmolLM2-135M-Instruct, `spin import-gguf smollm2`) and its chat-task prompts, the fp32 matmul
FLOP/s at a model's shapes (`matmul_peak`), thread settings, peak memory, JSON output,
the pipeline's sample / generate / build steps run by the plain driver
(`sample_with_ids`, `generate_and_build`), and `TrainPhases`, the phase split of one `train_iteration`.

Every benchmark prints exactly one JSON line on stdout (its figures, the ratio or
the target it is held to, the machine, the date and the command) and appends the
same line to `benchmarks/.cache/results.jsonl`, from which `benchmarks.report`
writes the table in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
RESULTS = CACHE / "results.jsonl"


def offline() -> None:
    """The environment every benchmark runs in, set first thing in its `main` (and inherited by
    the processes it starts): no telemetry, no hub lookups, offline like `spin demo`; and
    DeepSpeed's CPU communication op, compiled on first use (~25-80 s), built in a private
    directory, so that other environments on this machine, which build it with other flags
    into the shared ~/.cache, cannot force a rebuild in the middle of a measurement.
    Importing this module sets nothing: the tests import it."""
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": str(CACHE / "torch_extensions"),
    }.items():
        os.environ.setdefault(key, value)


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --quick and --threads."""
    args = argparse.ArgumentParser(description=description)
    args.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, the same for both sides of a comparison (default: 1; "
        "see docs/PERFORMANCE.md for why not 2 on a shared 2-core machine)",
    )
    return args


def training_parser(description: str, sides: list[str]) -> argparse.ArgumentParser:
    """`parser` plus the hidden arguments a training benchmark passes to each side's process."""
    args = parser(description)
    args.add_argument("--side", choices=sides, help=argparse.SUPPRESS)
    args.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    args.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    return args


def setup(threads: int) -> None:
    """Quiet logging and a fixed torch thread count."""
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "deepspeed", "DeepSpeed", "prefect", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    CACHE.mkdir(parents=True, exist_ok=True)


def toy():
    """The embedded default's θ0 and data, built once into benchmarks/.cache/toy (~25 s)."""
    from spin_core.toy import build_toy

    return build_toy(CACHE / "toy")


MODELS = ("toy", "smollm2")


def add_model_argument(args: argparse.ArgumentParser) -> None:
    """--model: the toy θ0 (fixed costs dominate) or the real chat model (compute dominates)."""
    args.add_argument(
        "--model",
        choices=MODELS,
        default="smollm2",
        help="smollm2: SmolLM2-135M-Instruct as `spin import-gguf smollm2` imported it "
        "(default); toy: the embedded default's 1M-parameter θ0",
    )


def smollm2_dir() -> Path:
    """The imported SmolLM2-135M-Instruct directory; exit 2 naming it if it is not there."""
    from spin_core.storage.gguf_import import SMOLLM2_DIR

    path = ROOT / SMOLLM2_DIR
    if not (path / "config.json").exists():
        print(
            f"--model smollm2: {path} has no config.json; import the model first "
            f"(`make setup`, or `spin import-gguf smollm2 {SMOLLM2_DIR}`)",
            file=sys.stderr,
        )
        sys.exit(2)
    return path


# The real model's prompts are longer (chat template with its default system turn): a
# limit that truncates none of them, so the per-prompt loop sees the same prompts.
SMOLLM2_MAX_PROMPT_LENGTH = 96


def smollm2_config(overrides: list[str] | None = None):
    """BENCH_CONFIG on the real chat model, with `key.sub=value` overrides applied."""
    from spin_core.config import apply_overrides, validate_config

    raw = apply_overrides(
        BENCH_CONFIG,
        [
            f"model.name_or_path={smollm2_dir()}",
            f"training.max_prompt_length={SMOLLM2_MAX_PROMPT_LENGTH}",
            *(overrides or []),
        ],
    )
    return validate_config(raw, source="benchmarks/_common.py BENCH_CONFIG (smollm2)")


def chat_sample(n: int, seed: int = 42):
    """`n` natural-language chat-task pairs (spin_core/chat_tasks.py) as prompts.parquet rows:
    id, prompt, real (no ids; `with_ids` adds them)."""
    import pandas as pd

    from spin_core.chat_tasks import make_pairs

    frame = make_pairs(n, seed)
    return pd.DataFrame(
        {
            "id": [f"chat-{seed}-{i}" for i in range(n)],
            "prompt": [messages[0]["content"] for messages in frame["messages"]],
            "real": [messages[1]["content"] for messages in frame["messages"]],
        }
    )


def model_shapes(config) -> list[tuple[int, int, int]]:
    """(in, out, count) of every weight matmul one token goes through in a Llama-like model
    (attention projections, MLP, the vocabulary head), from its HF config."""
    width, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or width // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    layer = [(width, q), (width, kv), (width, kv), (q, width)]
    layer += [(width, config.intermediate_size)] * 2 + [(config.intermediate_size, width)]
    return [(i, o, layers) for i, o in layer] + [(width, config.vocab_size, 1)]


def matmul_peak(config, tokens: int = 512, dtype: str = "float32", repeats: int = 3) -> float:
    """FLOP/s of torch.mm at the model's shapes: (tokens × in)·(in × out) for every weight
    matmul of one forward pass (`model_shapes`), each timed `repeats` times (the fastest kept),
    summed as a forward pass sums them. Measured in the calling process, at its thread count,
    so it is the bound this run's model could reach on this machine, under its current load."""
    import torch

    kind = getattr(torch, dtype)
    flops = seconds = 0.0
    with torch.no_grad():
        for fan_in, fan_out, count in model_shapes(config):
            a = torch.randn(tokens, fan_in, dtype=kind)
            b = torch.randn(fan_in, fan_out, dtype=kind)
            torch.mm(a, b)  # warm-up
            best = math.inf
            for _ in range(repeats):
                started = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - started)
            flops += count * 2.0 * tokens * fan_in * fan_out
            seconds += count * best
    return flops / seconds


def parameter_count(model_dir: Path) -> int:
    """Parameters stored in a model directory's safetensors (tied weights counted once)."""
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    return total


def toy_prompts(n: int) -> list[str]:
    """The first `n` prompts of the toy training data."""
    import pandas as pd

    frame = pd.read_parquet(toy().train_path, columns=["messages"])
    if n > len(frame):
        raise ValueError(f"asked for {n} toy prompts, the toy data has {len(frame)}")
    return [messages[0]["content"] for messages in frame["messages"][:n]]


# The benchmarks' own config: configs/demo.yaml as of the issue (greedy y', history 1,
# RMSprop), written out so that tuning the demo does not move the measurements.
BENCH_CONFIG = {
    "run": {"name": "bench", "iterations": 3, "collapse_tolerance": 0.5, "baseline": "none"},
    "data": {"num_prompts": 1500, "eval_size": 500, "history": 1, "seed": 42},
    "model": {"precision": "fp32"},
    "generation": {
        "do_sample": False,
        "max_new_tokens": 32,
        "batch_tokens": 16384,
        "max_batch_size": 256,
        "shard_size": 500,
    },
    "training": {
        "beta": 0.1,
        "learning_rate": 1.0e-5,
        "optimizer": "rmsprop",
        "num_epochs": 2,
        "global_batch_size": 32,
        "micro_batch_size": 32,
        "max_length": 128,
        "max_prompt_length": 64,
        "gradient_checkpointing": False,
        "zero_stage": 0,
        "save_steps": 20,
        "eval_steps": 0,
        "score_batch_tokens": 16384,
        "logprob_chunk_size": 1024,
    },
}


def toy_config(overrides: list[str] | None = None):
    """BENCH_CONFIG pointed at the cached toy, with `key.sub=value` overrides applied."""
    from spin_core.config import apply_overrides, validate_config

    artifacts = toy()
    raw = apply_overrides(
        BENCH_CONFIG,
        [
            *artifacts.config_overrides(),
            *(overrides or []),
        ],
    )
    return validate_config(raw, source="benchmarks/_common.py BENCH_CONFIG")


def with_ids(sample, cfg, tokenizer=None):
    """`sample` with prompt_ids and real_ids, as the pipeline's sample step writes prompts.parquet.

    The tokenizer is θ0's (`cfg.model.name_or_path`) unless given; prompts are
    left-truncated to `training.max_prompt_length` (`spin_core.prompts.encode_pairs`).
    """
    from spin_core.prompts import encode_pairs
    from spin_core.storage.models import load_tokenizer

    if tokenizer is None:
        tokenizer = load_tokenizer(
            str(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
        )
    prompt_ids, real_ids = encode_pairs(tokenizer, sample, cfg.training.max_prompt_length)
    return sample.assign(prompt_ids=prompt_ids, real_ids=real_ids)


def sample_with_ids(cfg, num_prompts: int, *, seed: int | None = None):
    """prompts.parquet of the pipeline: `num_prompts` seeded pairs of the config's data, with
    ids, written by the pipeline's own sample step (spin_core/steps.py: sample_prompts)."""
    import pandas as pd

    from spin_core import steps
    from spin_core.driver import PlainRunner

    cfg = cfg.model_copy(deep=True)
    cfg.data.num_prompts = num_prompts
    if seed is not None:
        cfg.data.seed = seed
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        return pd.read_parquet(PlainRunner().step(steps.sample_prompts, cfg, tmp, 0))


def generate_and_build(cfg, prompts, out_dir: Path, *, opponent: str | None = None):
    """(D_t, counts): the opponent's generations for `prompts` (with ids), identical pairs
    dropped, by the pipeline's own generate and build steps (iteration 0 in `out_dir`)."""
    import pandas as pd

    from spin_core import steps
    from spin_core.driver import PlainRunner
    from spin_core.storage.files import write_parquet_atomic
    from spin_core.storage.rundir import RunDir

    run, runner = RunDir(out_dir), PlainRunner()
    write_parquet_atomic(prompts, run.prompts(0))
    opponent = opponent or str(cfg.model.name_or_path)
    runner.step(steps.generate_responses, cfg, str(run.root), 0, opponent)
    counts = runner.step(steps.build_training_set, cfg, str(run.root), 0)
    return pd.read_parquet(run.pairs(0)), counts


class TrainPhases:
    """Wall seconds of one in-process `train_iteration` call, phase by phase.

    Timed by the call's own hooks, given to it as `on_phase=phases.on_phase` and
    `on_step=phases.on_step` (or, through the pipeline's train step, by a context whose
    `phase` is `on_phase`), inside `with phases.timing():`

    - load: from the call to the start of scoring (process group, θt loaded,
      DeepSpeed engine built);
    - scoring: θt's log-probs of the unscored pairs by the engine, written to
      `scored_path`;
    - steps: from the end of scoring to the last step's record (the pairs' ids
      into examples, then every optimizer step), less checkpoints in between;
    - checkpoint: DeepSpeed checkpoints; export: the HF model directory of θ(t+1);
    - other: the rest (closing the step loop and TensorBoard writer).

    On a CUDA device `cuda_peaks` holds the peak allocated memory (MiB) of each
    phase (load, scoring, steps, checkpoint, export), the peak counter being reset
    at every phase boundary.

    Meant for pairs without opponent log-probs (the pipeline's pairs.parquet);
    with pre-scored pairs there is no scoring span and `split` raises.
    """

    PHASES = ("scoring", "checkpoint", "export")
    # The phase that ends where a timed phase starts.
    BEFORE = {"scoring": "load", "checkpoint": "steps", "export": "other"}

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[float, float]]] = {name: [] for name in self.PHASES}
        self.step_ends: list[float] = []
        self.records: list[dict] = []
        self.started = self.ended = 0.0
        self.cuda_peaks: dict[str, float] = {}
        self._open: dict[str, float] = {}

    def _phase_ends(self, phase: str) -> None:
        """On CUDA: the peak allocated memory since the last boundary belongs to `phase`."""
        import torch

        if not torch.cuda.is_available():
            return
        peak = torch.cuda.max_memory_allocated() / 2**20
        self.cuda_peaks[phase] = round(max(peak, self.cuda_peaks.get(phase, 0.0)), 1)
        torch.cuda.reset_peak_memory_stats()

    def on_step(self, record: dict) -> None:
        self.step_ends.append(time.perf_counter())
        self.records.append(record)

    def on_phase(self, name: str, event: str) -> None:
        """`train_iteration`'s on_phase: `name` ("scoring", "checkpoint", "export") starts or ends."""
        if event == "start":
            self._phase_ends(self.BEFORE[name])
            self._open[name] = time.perf_counter()
        else:
            self.spans[name].append((self._open.pop(name), time.perf_counter()))
            self._phase_ends(name)

    @contextmanager
    def timing(self):
        """Time the block as the whole call."""
        self._phase_ends("before")  # resets the peak counter on CUDA
        self.started = time.perf_counter()
        try:
            yield self
        finally:
            self.ended = time.perf_counter()
            self._phase_ends("other")
            self.cuda_peaks.pop("before", None)

    def step_seconds(self) -> list[float]:
        """Seconds of each optimizer step; the first also holds the pairs' set-up after scoring."""
        starts = [self.spans["scoring"][0][1], *self.step_ends[:-1]]
        return [round(b - a, 4) for a, b in zip(starts, self.step_ends, strict=True)]

    def split(self) -> dict[str, float]:
        if not self.spans["scoring"]:
            raise RuntimeError("train_iteration did not score the pairs: give it unscored pairs")
        if not self.step_ends:
            raise RuntimeError("train_iteration ran no optimizer step")
        score_start, score_end = self.spans["scoring"][0]
        last_step = self.step_ends[-1]

        def total(name: str, before: float | None = None) -> float:
            return sum(
                end - start for start, end in self.spans[name] if before is None or end <= before
            )

        phases = {
            "total": self.ended - self.started,
            "load": score_start - self.started,
            "scoring": score_end - score_start,
            "steps": last_step - score_end - total("checkpoint", before=last_step),
            "checkpoint": total("checkpoint"),
            "export": total("export"),
        }
        phases["other"] = phases["total"] - sum(v for k, v in phases.items() if k != "total")
        return {k: round(v, 3) for k, v in phases.items()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class Timer:
    """Wall and CPU seconds of a `with` block: `with Timer() as t: ...; t.wall, t.cpu`."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = 0.0, 0.0
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def load_average() -> float:
    """1-minute load average: other work on the machine skews every wall time."""
    return round(os.getloadavg()[0], 2)


def machine() -> str:
    """CPU model, usable cores, memory, and torch version in one line."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB{gpu}, "
        f"torch {torch.__version__}"
    )


def command() -> str:
    """The command line that reproduces this run (as a module, from the repository root)."""
    module = sys.modules["__main__"].__spec__
    name = module.name if module else sys.argv[0]
    return " ".join(["python -m", name, *sys.argv[1:]])


def emit(benchmark: str, figures: dict, *, target: str, met: bool | None, quick: bool) -> dict:
    """Print the benchmark's JSON line and append it to the results file."""
    record = {
        "benchmark": benchmark,
        **figures,
        "target": target,
        "target_met": met,
        "quick": quick,
        # Which spin_core ran: the working tree, or e.g. one with a PROPOSED_*.diff applied.
        "code": os.environ.get("SPIN_BENCH_CODE", "working tree"),
        "load_avg_1min": load_average(),
        "machine": machine(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command(),
    }
    line = json.dumps(record, default=float)
    CACHE.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as results:
        results.write(line + "\n")
    print(line, flush=True)
    return record


def warm_up_deepspeed() -> None:
    """Build (once) and load DeepSpeed's CPU op in a throwaway process, outside any timing."""
    code = "from spin_core.training.train import init_distributed; init_distributed()"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)


def run_json(module: str, *args: str, timeout: float = 1800) -> dict:
    """Run `python -m module args` in a fresh process; its last stdout line, parsed as JSON.

    A fresh process per measured side keeps peak RSS and allocator state of one
    side from leaking into the other.
    """
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-8000:])
        raise RuntimeError(f"python -m {module} {' '.join(args)} exited {done.returncode}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise RuntimeError(f"python -m {module} {' '.join(args)} printed no JSON line")
    return json.loads(lines[-1])
