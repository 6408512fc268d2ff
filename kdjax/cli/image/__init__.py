"""The image wing of the command line: data, models (``arch`` for the user's
own), the training task handed to :mod:`kdjax.cli.trainer`, evaluation and
the report."""
