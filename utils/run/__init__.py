"""One training run around the DRaFT+ step: argument checks, the output directory, checkpoints and resume, the
objective, guards, preemption, metrics, validation, curves, the model card and the end of the run."""
