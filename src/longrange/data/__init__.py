"""Data: the byte tokenizer, corpora (the built-in one included), samplers, synthetic tasks."""

from longrange.data.corpus import Corpus, Document, load_corpus
from longrange.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "Corpus", "Document", "load_corpus"]
