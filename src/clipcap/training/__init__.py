"""Training: caption batches, the loop, checkpoints, data-parallel processes."""
