"""Tiny randomly initialised models of real architectures (Llama, GPT-2), for tests and benchmarks.

A forward pass takes milliseconds on a CPU, yet they are the Hugging Face classes real checkpoints
load into, so what depends on the architecture (attention masks, position ids, KV caches, padding)
runs as it will on a real model. Same arguments, same weights: each build seeds torch first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fspo.models.tokenizer import train_tokenizer

Vocab = int | PreTrainedTokenizerBase


def _vocab_fields(vocab: Vocab) -> dict[str, Any]:
    """A vocabulary size, or a tokenizer's size and special token ids (so generation stops and pads)."""
    if isinstance(vocab, int):
        return {"vocab_size": vocab}
    return {
        "vocab_size": len(vocab),
        "bos_token_id": vocab.bos_token_id,
        "eos_token_id": vocab.eos_token_id,
        "pad_token_id": vocab.pad_token_id,
    }


def _seeded(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def tiny_llama(vocab: Vocab, seed: int | None = 0, attn: str = "sdpa", **config: Any) -> LlamaForCausalLM:
    """A 2-layer `LlamaForCausalLM`, width 32, 4 query and 2 key-value heads; `config` overrides
    any `LlamaConfig` field. `seed=None` draws the weights from torch's current random state."""
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    fields |= dict(num_attention_heads=4, num_key_value_heads=2)
    cfg = LlamaConfig(**{**fields, **_vocab_fields(vocab), **config})
    _seeded(seed)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn)


def tiny_gpt2(vocab: Vocab, seed: int | None = 0, attn: str = "sdpa", **config: Any) -> GPT2LMHeadModel:
    """A 2-layer `GPT2LMHeadModel`, width 32, 2 heads, 512 positions; `config` overrides any
    `GPT2Config` field. `seed=None` draws the weights from torch's current random state."""
    fields = dict(n_embd=32, n_layer=2, n_head=2, n_positions=512)
    cfg = GPT2Config(**{**fields, **_vocab_fields(vocab), **config})
    _seeded(seed)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)


def tiny_lm(texts: Sequence[str], seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A byte-level BPE tokenizer (400 tokens) trained on `texts` and a `tiny_llama` on it, in eval mode."""
    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = tiny_llama(tokenizer, seed=seed, max_position_embeddings=1024)
    return model.eval(), tokenizer
