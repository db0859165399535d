"""Training θ(t+1) from θt: the DeepSpeed loop and everything around it.

- `train`: the loop over a `TrainJob` (`train_iteration`, `run_rank`);
- `job`: what one iteration's training is given (`TrainJob`);
- `state`: DeepSpeed checkpoints, resume and seeding;
- `export`: θ(t+1) as a Hugging Face model directory;
- `health`: the held-out log-likelihood checked during training;
- `memory`: the ZeRO memory model behind `spin check`;
- `launch`: the torchrun / deepspeed commands of several ranks and nodes;
- `rank` and `node`: the launched rank's and a follower node's entry points
  (`python -m spin_core.training.node RUN_DIR` on the nodes other than 0).
"""
