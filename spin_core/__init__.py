"""spin's library: SPIN (Chen et al., 2024) as functions and steps, with no Prefect in it.

The modules sit in layers; a module imports its own layer and the ones above it in this
list, never one below (tests/test_imports.py holds the few exceptions left, a list that
may only shrink):

- vocabulary: `config` (every setting, validated), `config_reference`, `errors`;
- runtime: `runtime/` (this rank's device and collectives, worker devices, child
  processes, memory release);
- storage: `files` (atomic writes, Parquet I/O), `rundir` (the run directory's layout and
  lock), `models` (Hugging Face model directories: load, save, check), `gguf_import`,
  `provenance` (a model directory's fingerprint), `train_job`;
- algorithm, the paper's words: `loss`, `logprobs`, `score`, `prompts`, `data`, `evaluate`,
  `lm_eval`, `generation/` (θt writes y'), and training: `train` (the loop), `train_state`
  (DeepSpeed checkpoints, resume), `export`, `health`, `memory` (the ZeRO memory model),
  `launch`, `train_entry` and `train_node` (the launched ranks and nodes);
- pipeline: `step` (what a step is), `steps` (the steps), `pipeline` (the loop over
  iterations), `driver` (the pipeline without Prefect), `console` (a step's lines while it
  runs), `status` (`spin status`, after the fact);
- reports and the embedded default: `report`, `significance`, `compare`, `compare_report`,
  `tracking`, `preflight`, `toy`, `chat_tasks`.

`tasks/` and `flows/` (Prefect) sit above all of them; nothing here imports them.
"""

LAYERS = {
    "vocabulary": ("config", "config_reference", "errors"),
    "runtime": ("runtime",),
    "storage": ("files", "rundir", "models", "gguf_import", "provenance", "train_job"),
    "algorithm": (
        "loss",
        "logprobs",
        "score",
        "prompts",
        "data",
        "evaluate",
        "lm_eval",
        "generation",
        "train",
        "train_state",
        "export",
        "health",
        "memory",
        "launch",
        "train_entry",
        "train_node",
    ),
    "pipeline": ("step", "steps", "pipeline", "driver", "console", "status"),
    "reports": (
        "report",
        "significance",
        "compare",
        "compare_report",
        "tracking",
        "preflight",
        "toy",
        "chat_tasks",
    ),
}
