"""Benchmarks and the demo model zoo; imports `pipeline`, never the reverse, and stays out of `make test`."""
