"""An offline CLIP tokenizer: byte-level vocabulary, no merges, nothing downloaded.

Real SDXL checkpoints ship their own tokenizers; the built-in models use this one so that a fresh
machine with no hub access can still encode prompts (one token per character, word ends marked).
"""

from __future__ import annotations

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

MAX_LENGTH = 77
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def offline_vocab() -> dict[str, int]:
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), *SPECIAL_TOKENS]
    return {token: index for index, token in enumerate(tokens)}


def build_offline_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=offline_vocab(), merges=[], model_max_length=MAX_LENGTH)
