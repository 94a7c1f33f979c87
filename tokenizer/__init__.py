"""Subword tokenization for minilm: a SentencePiece tokenizer with fixed special-token ids.

    from tokenizer import Tokenizer, SPECIAL_TOKENS
    tok = Tokenizer.train(Path("corpus.txt"), vocab_size=8000)   # a path; a list of str is texts
    tok.save("out/tok"); tok = Tokenizer.load("out/tok")
    batch = tok(["a sentence", "another"], return_tensors="pt")

This package is independent of ``minilm`` (it imports nothing from it).
"""

from .sentencepiece_tokenizer import SPECIAL_TOKEN_IDS, SPECIAL_TOKENS, TOKENIZER_TYPES, Tokenizer, TokenizerType

__all__ = ["Tokenizer", "TokenizerType", "TOKENIZER_TYPES", "SPECIAL_TOKENS", "SPECIAL_TOKEN_IDS"]
