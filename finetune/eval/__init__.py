"""Evaluation: tasks, metrics, thresholds, reports and plots; arrays in, numbers and files out."""
