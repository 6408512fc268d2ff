"""kdjax.checkpoint."""
