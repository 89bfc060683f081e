"""Datasets, transforms and the embedded demo data."""
