"""Serving token reads to internal services: the routes, the pure-ASGI fast path, the cache,
API keys and limits."""
