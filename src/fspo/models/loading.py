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


# The files a tokenizer is read from (fast, SentencePiece, BPE, WordPiece); a folder with none of them
# holds only a model, whatever else is wrong.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def load_tokenizer(model_id: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained`, with a pad token guaranteed (eos if the model has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_id))
    except (OSError, ValueError) as err:
        folder = Path(model_id)
        if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
            names = ", ".join(TOKENIZER_FILES)
            raise UserError(
                f"model folder {str(model_id)!r} is not a loadable Hugging Face model: it has no tokenizer "
                f"files (one of {names}): copy them "
                "from where the model came from, or save the tokenizer with the model"
            ) from None
        raise _not_found(str(model_id), err) from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_id: str | Path, dtype: Any = None) -> Any:
    """`AutoModelForCausalLM.from_pretrained` in float32 by default (CPU training)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(model_id), dtype=dtype or torch.float32)
    except (OSError, ValueError) as err:
        raise _not_found(str(model_id), err) from None
    except SafetensorError as err:
        # A weights file cut short (a killed save or copy) fails in its header; name the files so the
        # user knows which folder to save or copy again.
        files = sorted(p.name for p in Path(model_id).glob("*.safetensors")) or ["model.safetensors"]
        raise UserError(
            f"model folder {str(model_id)!r}: cannot read its weights ({', '.join(files)}): {err}; "
            "the file is incomplete or damaged, save or copy the model again"
        ) from None
