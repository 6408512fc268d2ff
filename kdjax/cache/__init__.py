"""kdjax.cache."""
