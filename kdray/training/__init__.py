"""One training run: config, prepare, generation, step loop, fit, checkpoints, a run end to end, teacher sets."""
