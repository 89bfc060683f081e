"""Training: the loop and its Hook type, fit, the run directory, lr-find, and the one assembly of a run."""
