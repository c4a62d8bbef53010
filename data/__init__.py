"""Embedded toy data: the fictional world generator, its tokenizer trainer and the dataset readers."""
