"""Torch-facing data code: preprocessing with its exact inverse, datasets."""
