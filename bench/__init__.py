"""Benchmark harness for the broker (`make bench`; not part of `make test`). See README.md."""
