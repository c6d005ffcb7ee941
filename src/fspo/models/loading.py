"""Load any causal LM (a local folder or, where reachable, a hub id) with one clear error otherwise.

Everything downstream (training, evaluation, serving) goes through `load_model`/`load_tokenizer`, so
the embedded default and any Hugging Face causal LM are interchangeable: both are plain model folders
read by `AutoModelForCausalLM` / `AutoTokenizer`.

A folder holding another model's tokenizer loads without complaint in transformers and then fails far
away (an IndexError in the embedding) or, worse, runs on token ids that mean other words to the model.
`load_tokenizer` therefore checks the tokenizer against the embedding its folder's config declares
(`tokenizer_misfit`), and `require_same_tokenizer` checks a second model (a reference) against it.
Only sizes can be compared without the original tokenizer: two tokenizers of the same size, or one a
few percent smaller than a padded embedding, are not told apart.
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
# How much larger than its tokenizer a model's embedding may be. Tables are padded to a multiple of 64 to
# 1024 rows or keep reserved rows (Qwen2.5: 271 of 151936, Phi-2: 905 of 51200, DeepSeek-V2: 2398 of
# 102400, the most seen), never this much; a tokenizer smaller by more than this fraction of the rows is
# another model's. The embedded default sizes its table to its tokenizer exactly.
PADDING_FRACTION = 0.03


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
    rows = embedding_rows(model_id)
    problem = None if rows is None else tokenizer_misfit(tok, rows)
    if problem:
        raise UserError(
            f"model folder {str(model_id)!r}: {problem} (config.json vocab_size): the tokenizer is another "
            "model's; copy in the tokenizer files saved with this model"
        )
    return tok


def embedding_rows(model_id: str | Path) -> int | None:
    """The rows of the input embedding a local model folder's config declares (its ``vocab_size``);
    None for a hub id, a folder without config.json, or a config that does not say."""
    config_file = Path(model_id) / "config.json"
    if not config_file.is_file():
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_id))
    except (OSError, ValueError, KeyError):
        return None  # load_model says what is wrong with the config
    rows = getattr(config.get_text_config(), "vocab_size", None)
    return rows if isinstance(rows, int) and rows > 0 else None


def tokenizer_misfit(tokenizer: Any, rows: int) -> str | None:
    """Why `tokenizer` cannot be the tokenizer of an embedding of `rows` rows, or None when it may be.

    Its own vocabulary and its special tokens must have rows; tokens added on top may lie past the
    table (Gemma 3 adds an image token there that text never produces). It must not be smaller than
    any padding of the table explains (`PADDING_FRACTION`).
    """
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    outside = {name: i for name, i in special.items() if isinstance(i, int) and i >= rows}
    if tokenizer.vocab_size > rows or outside:
        shown = ", ".join(f"{name} id {i}" for name, i in outside.items())
        return (
            f"the tokenizer has {tokenizer.vocab_size} tokens{f' ({shown})' if shown else ''} but the "
            f"model's embedding only {rows} rows"
        )
    if rows - len(tokenizer) > PADDING_FRACTION * rows:
        return f"the tokenizer has {len(tokenizer)} tokens, far fewer than the model's {rows} embedding rows"
    return None


def require_same_tokenizer(tokenizer: Any, model_id: str | Path, option: str, of: str) -> None:
    """Refuse `model_id` (given as `option`) unless it reads the token ids of `tokenizer` (the tokenizer
    of `of`) as the same tokens: its embedding fits `tokenizer` (`tokenizer_misfit`) and its own
    tokenizer, where its folder has one, has the same vocabulary."""
    folder = Path(model_id)
    rows = embedding_rows(folder)
    problem = None if rows is None else tokenizer_misfit(tokenizer, rows)
    if problem is None and any((folder / name).exists() for name in TOKENIZER_FILES):
        own = load_tokenizer(folder)
        if own.get_vocab() != tokenizer.get_vocab():
            problem = f"its tokenizer ({len(own)} tokens) differs from that one ({len(tokenizer)} tokens)"
    if problem:
        raise UserError(
            f"{option} {str(model_id)!r} does not share the tokenizer of {of}: {problem}, so the two models "
            "would read the same token ids as different text; give a model of the same family"
        )


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
