"""A tiny random Qwen3 with a real-size vocabulary (151,936 rows, as Qwen3's checkpoints have),
for tests of the paths whose cost grows with the vocabulary: in-engine MC draws and top-K, and
the chunked teacher scorer.

The tokenizer is the toy char tokenizer (prompts only use its ids); the model can still emit
any of the 151,936 ids, so engines must not need to detokenize them (no stop strings).
"""

from __future__ import annotations

from pathlib import Path

import torch
from asyncopd.tasks.toy.tokenizer import build_tokenizer
from transformers import Qwen3Config, Qwen3ForCausalLM

QWEN3_VOCAB = 151_936


def make_wide_qwen3(
    directory: Path, *, vocab_size: int = QWEN3_VOCAB, seed: int = 0, layers: int = 1, scale: float = 6.0
) -> Path:
    """Save a random Qwen3 (hidden 64, head_dim 32 as vLLM-CPU needs) with `vocab_size` rows.

    `scale` multiplies the (tied) embeddings. At 6 the next-token distribution peaks on the last
    input id (p ~ 0.1) and spreads the rest over the whole vocabulary (entropy ~ 10.5 nats):
    top-p and temperature change μ visibly, and draws land on ids far beyond the toy 32.
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
