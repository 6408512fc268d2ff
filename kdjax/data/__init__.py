"""kdjax.data."""
