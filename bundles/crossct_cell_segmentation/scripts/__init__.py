"""Glue for the CrossCT bundle. The algorithms live in the project's shared ``common`` package; MONAI Label
expects a bundle's own Python package to be called ``scripts``, so it exists, and holds nothing algorithmic."""
