"""The command line's configs: ``base`` (fields, merging, ``--set``
overrides, errors), ``image`` (``kdjax distill``/``train-teacher``/...,
schema in ``image_schema``) and ``lm`` (``kdjax lm ...``)."""
