"""Load any causal LM (a local folder or, where reachable, a hub id) with one clear error otherwise.

Everything downstream (training, evaluation, serving) goes through `load_model`/`load_tokenizer`, so
the embedded default and any Hugging Face causal LM are interchangeable: both are plain model folders
read by `AutoModelForCausalLM` / `AutoTokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fspo.core.errors import UserError


def _not_found(model_id: str, err: Exception) -> UserError:
    path = Path(model_id)
    if path.exists() and path.is_dir():
        return UserError(
            f"model folder {model_id!r} is not a loadable Hugging Face model ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        )
    return UserError(
        f"model {model_id!r} is neither a local model folder nor available offline "
        "(no model hub here): create one with `fspo model init` or pass a model folder"
    )


def load_tokenizer(model_id: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained`, with a pad token guaranteed (eos if the model has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_id))
    except (OSError, ValueError) as err:
        raise _not_found(str(model_id), err) from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_id: str | Path, dtype: Any = None) -> Any:
    """`AutoModelForCausalLM.from_pretrained` in float32 by default (CPU training)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(model_id), dtype=dtype or torch.float32)
    except (OSError, ValueError) as err:
        raise _not_found(str(model_id), err) from None
