"""The digits teacher's text side, built from its vocabulary (nothing downloaded): a CLIP BPE tokenizer of single
characters plus whole words, a small CLIP text encoder, and SD 1.5's DDPM scheduler config it was trained under.
The test fixtures (tests/tiny.py) build their tiny pipelines from the same pieces.
"""

from __future__ import annotations

import string
from typing import Iterable

SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def build_clip_tokenizer(words: Iterable[str] = (), model_max_length: int = 77):
    """A CLIP BPE tokenizer whose vocabulary is single characters plus the given whole words."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    add("<|startoftext|>")
    add("<|endoftext|>")
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if len(w) > 1}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if (left, right) not in merges:
                merges.append((left, right))
            add(merged)
            left = merged
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    # BPE applies its merges by rank, so one word's chain can break another's: with "right" before "triangle", r+i
    # merges before t+r and "triangle" ends as t, ri, a, n, ... Each word left in pieces gets merges of its first two
    # pieces, ranked last, until it is one token (a word already one token has no pair left to merge).
    for word in sorted({w.lower() for w in words if len(w) > 1}):
        pieces = tok.tokenize(word)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            add(pieces[0] + pieces[1])
            tok = CLIPTokenizer(vocab=vocab, merges=merges)
            pieces = tok.tokenize(word)
    tok.model_max_length = model_max_length
    return tok


def clip_text_encoder(vocab_size: int, hidden: int, projection: int | None, max_positions: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=max_positions, projection_dim=projection or hidden,
        bos_token_id=0, eos_token_id=eos, pad_token_id=eos,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
