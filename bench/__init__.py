"""Benchmarks: the load generator, the router-overhead suite with paced workers, the engine figures."""
