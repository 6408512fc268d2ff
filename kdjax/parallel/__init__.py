"""kdjax.parallel."""
