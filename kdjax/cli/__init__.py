"""kdjax.cli: the ``kdjax`` command line (``kdjax.cli.main:main``).

Subcommands ``train-teacher``, ``cache-teacher``, ``distill``, ``eval``,
``export``, ``report`` and ``config``, configured by YAML files and
``--set key=value`` overrides (:mod:`kdjax.cli.config`). Expected calibration
error lives in the library (:mod:`kdjax.metrics`). Importing this package imports
no JAX; the commands import what they need.
"""
