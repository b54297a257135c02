"""C tools of the benchmarks (the load generator, the ceiling server) and their build."""
