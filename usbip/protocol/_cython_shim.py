"""Stands in for the ``cython`` module when Cython is not installed: the codec runs uncompiled."""

compiled = False
