"""Where work runs: child processes and their groups (`processes`), devices, thread counts
and memory (`devices`). Nothing here knows SPIN; the training launch
(`spin_core.training.launch`) and the generation workers (`spin_core.generation.workers`) use it."""
