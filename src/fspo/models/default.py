"""The embedded default model: a domain tokenizer and a small Llama (0.15M to 4M parameters), made locally.

It is the analogue of the paper's pretrained instruct model (Llama 3.2 3B): `init_model` creates it,
`fspo.models.pretrain.pretrain` teaches it to "speak the domain" and the FSPO layout. The result is a
normal Hugging Face model folder, so every later stage loads it like any model id, and any other
causal LM folder can replace it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from fspo.core.files import atomic_write_json

Size = Literal["tiny", "small", "medium", "base"]

# Sized for CPU training: on a quiet 2-core machine ~1M params train at ~14.5k tok/s, ~5M at ~3.7k.
_LLAMA = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(zip(_LLAMA, (1024, 64, 2, 4, 176), strict=True)),  # ~0.15M params: tests
    "small": dict(zip(_LLAMA, (2048, 96, 3, 4, 256), strict=True)),  # ~0.5M params: `fspo model init`
    "medium": dict(zip(_LLAMA, (1024, 128, 4, 4, 384), strict=True)),  # ~1M params: the quickstart
    "base": dict(zip(_LLAMA, (4096, 256, 4, 8, 704), strict=True)),  # ~4M params
}


def init_model(
    out: str | Path, texts: Sequence[str], size: Size = "small", seed: int = 0, max_positions: int = 2048
) -> Path:
    """Train the tokenizer on `texts`, create a randomly initialised `LlamaForCausalLM`, save both.

    Written to a temporary sibling folder and renamed, so `out` is either complete or absent.
    """
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fspo.core.errors import UserError
    from fspo.models.tokenizer import train_tokenizer

    if size not in SIZES:
        raise UserError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    if not texts:
        raise UserError("the corpus is empty: the tokenizer needs some text to learn from")
    spec = dict(SIZES[size])
    tokenizer = train_tokenizer(texts, vocab_size=spec.pop("vocab_size"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **spec,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    atomic_write_json(
        tmp / "fspo_model.json", {"size": size, "seed": seed, "parameters": n_params, "pretrained": False}
    )
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if not is_model_file(p.name))
        if foreign:
            shutil.rmtree(tmp)
            raise UserError(
                f"{out} holds files that are not a model's ({', '.join(foreign[:4])}); "
                "choose a new or empty folder"
            )
        shutil.rmtree(out)  # a model folder: replaced whole
    tmp.rename(out)
    return out


# The files of a model folder as `save_pretrained` and `init_model` write them, and its run record.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
               "added_tokens.json", "fspo_model.json", "fspo_run.json")  # fmt: skip


def is_model_file(name: str) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(name, pattern) for pattern in MODEL_FILES)


def read_corpus(path: str | Path) -> list[str]:
    """A plain-text corpus: one document per blank-line-separated block (or per line if no blanks)."""
    from fspo.core.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"corpus file {str(path)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if len(docs) <= 1:
        docs = [line.strip() for line in text.splitlines() if line.strip()]
    return docs
