"""Coverage-guided atheris fuzz targets, the seed corpus generator and the soak test (see fuzz/README.md)."""
