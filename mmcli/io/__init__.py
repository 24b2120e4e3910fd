"""File input and output for mmcli: finding inputs and reading radiographs.

Nothing in this package imports torch; it deals in paths, numpy arrays and metadata.
"""
