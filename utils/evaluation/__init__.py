"""Evaluation of trained LoRAs: the evaluator (`python -m utils.evaluation`), its settings, plan and outputs,
the diversity metric, annealed importance guidance (AIG) and image grids."""
