"""Seeded tiny GPT-2 (biases, gains and shifted embeddings randomised so recentring and folds show) and data."""

from __future__ import annotations

import numpy as np
import torch

from normfold.finetune.data import TokenData
from normfold.models.transformer_zoo import randomize_norms_and_biases, shift_rows

VOCAB, SEQ, WIDTH = 64, 16, 32


def tiny_gpt2(seed: int = 0, *, layers: int = 2, tied: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=WIDTH, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=tied, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(seed + 1)
    randomize_norms_and_biases(model, generator)
    shift_rows(model.transformer.wte.weight, generator)
    shift_rows(model.transformer.wpe.weight, generator)
    return model.eval()


def tiny_data(seed: int = 0, tokens: int = 4000) -> TokenData:
    """A learnable stream: a repeated random phrase with 10% of the tokens replaced at random."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(0, VOCAB, size=37)
    ids = np.resize(phrase, tokens)
    noise = rng.random(tokens) < 0.1
    ids[noise] = rng.integers(0, VOCAB, size=int(noise.sum()))
    cut = int(tokens * 0.8)
    return TokenData(ids[:cut].astype(np.int64), ids[cut:].astype(np.int64))
