"""Meta-training and baseline runs: the training loop, run directories, run checkpoints, compute budgets."""
