"""spin's library: SPIN (Chen et al., 2024) as functions and steps, with no Prefect in it.

Its folders and modules sit in layers; each imports its own layer and the ones above it in
this list, never one below (tests/test_imports.py holds the few exceptions left, a list that
may only shrink):

- vocabulary: `config` (every setting, validated), `config_reference`, `errors`;
- `runtime/`: this rank's device and collectives, worker devices, child processes, memory;
- `storage/`: atomic files and Parquet, the run directory and its lock, the step journal,
  model directories, GGUF import, provenance;
- the algorithm, the paper's words, at the top: `loss`, `logprobs`, `score`, `prompts`,
  `data`, `evaluate`, `lm_eval`; with `generation/` (θt writes y') and `training/` (θ(t+1)
  from θt: the DeepSpeed loop, checkpoints, export, memory model, launchers);
- the pipeline: `execution` (what a step is and how it executes, journaled), `steps` (the
  steps), `pipeline` (the loop over iterations), `driver` (the pipeline without Prefect), `console` (a step's lines
  while it runs);
- `reports/` (reports, significance, comparisons, tracking, `spin check`, `spin status`) and
  the embedded default (`toy`, `chat_tasks`).

`tasks/` and `flows/` (Prefect) sit above all of them; nothing here imports them.
`train_node` is a shim: `python -m spin_core.train_node` still starts a follower node.
"""

LAYERS = {
    "vocabulary": ("config", "config_reference", "errors"),
    "runtime": ("runtime",),
    "storage": ("storage",),
    "algorithm": (
        "loss",
        "logprobs",
        "score",
        "prompts",
        "data",
        "evaluate",
        "lm_eval",
        "generation",
        "training",
        "train_node",
    ),
    "pipeline": ("execution", "steps", "pipeline", "driver", "console"),
    "reports": ("reports", "toy", "chat_tasks"),
}
