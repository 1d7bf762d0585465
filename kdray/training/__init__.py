"""One training run: config, prepare, generation, step loop, fit, checkpoints, the student file,
a run end to end, and teacher sets trained with the same loop."""
