"""Sweeps (lambda ablations) and the miniature reproduction of the paper's study."""
