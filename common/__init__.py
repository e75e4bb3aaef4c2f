"""Shared implementation behind the cellseg bundles: I/O, normalization, targets, post-processing, metric."""
