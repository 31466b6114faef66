"""Refreshing tokens exactly once per rotation: the engine, its breaker and its policy."""
