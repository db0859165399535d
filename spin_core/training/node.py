"""Another node of a multi-node torchrun job: `python -m spin_core.training.node RUN_DIR`.

Node 0 runs the pipeline (`spin run`, or the `spin-train` deployment's worker); every
other node of the job runs this. It waits for the training launches node 0 announces in
the shared run directory and starts its own ranks for each (torchrun, static rendezvous
at node 0's `training.rdzv_endpoint`), until the run ends. No SSH between the nodes: made
for Slurm (`srun`) and Kubernetes (an Indexed Job), whose node index it reads from
SLURM_NODEID, NODE_RANK or JOB_COMPLETION_INDEX unless `--node-rank` is given.
README "Several machines for one training step" has a Slurm script.

Exit codes: 0 the run ended; 2 no usable node rank; 1 a launch failed (with --once).
"""

from __future__ import annotations

import argparse
import sys

from spin_core.errors import InputError
from spin_core.training.launch import LaunchError, follow, node_rank_from_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spin_core.training.node", description=__doc__)
    parser.add_argument("run_dir", help="the run directory node 0 runs the pipeline in (shared)")
    parser.add_argument(
        "--node-rank", type=int, default=None, help="this node's rank, 1 … num_nodes − 1"
    )
    parser.add_argument("--once", action="store_true", help="join one launch, then exit")
    args = parser.parse_args(argv)
    node_rank = args.node_rank if args.node_rank is not None else node_rank_from_env()
    if node_rank is None or node_rank < 1:
        print(
            f"error: node rank {node_rank}: node 0 runs the pipeline (spin run); give the "
            "other nodes --node-rank 1 … num_nodes − 1 (or SLURM_NODEID / NODE_RANK)",
            file=sys.stderr,
        )
        return 2
    try:
        follow(args.run_dir, node_rank, once=args.once)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
