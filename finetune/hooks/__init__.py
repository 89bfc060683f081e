"""The hooks a run is assembled from: freezing, the probe, EMA, L2-SP, early stopping, DDP, loggers."""
