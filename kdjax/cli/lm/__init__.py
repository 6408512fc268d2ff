"""The language-model wing of the command line (``kdjax lm ...``): data
(corpus, tokenizer), models, and the task handed to :mod:`kdjax.cli.trainer`
(with evaluation, generation and the Hugging Face export)."""
