"""Data code: preprocessing with its exact inverse, datasets, and the one rule for dataset folders."""
