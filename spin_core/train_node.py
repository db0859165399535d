"""Moved to spin_core/training/node.py. `python -m spin_core.train_node` still works, so the
Slurm and Kubernetes scripts written for it keep running."""

import sys

from spin_core.training.node import main

if __name__ == "__main__":
    sys.exit(main())
