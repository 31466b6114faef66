"""Running the broker: the command line, the demo, the embedded database, health and request
metrics."""
