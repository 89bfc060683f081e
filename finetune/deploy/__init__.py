"""The model out of its run directory: export, the Python predictor, prediction output."""
