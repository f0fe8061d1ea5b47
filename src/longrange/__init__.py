"""longrange: efficient long-context transformers on one set of tested layers."""
