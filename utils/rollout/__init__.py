"""The family- and sampler-agnostic rollout: the noise parametrisations, the sampling loop with the DRaFT+ step,
the samplers it can step, and `torch.compile` of its no-grad prefix."""
