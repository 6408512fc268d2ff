"""kdjax.cli."""
