"""Training: the trainer and its callbacks, and one experiment (train, select the epoch, final score)."""
