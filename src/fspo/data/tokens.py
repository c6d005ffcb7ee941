"""Token ids of prompts and targets, exactly as training, evaluation and serving tokenize them.

The prompt and the target are tokenized *separately* and their ids concatenated (the DPO reference
code's layout): a generator that appends the response heading as ids after the prompt then sees
the token boundary used in training, and the chosen and rejected targets share their prompt ids.
"""

from __future__ import annotations

from typing import Any


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer itself prepends bos (Llama-style) — then prompts start with bos here too.

    Asked of the tokenizer rather than assumed, so a model trained without bos (GPT-2) sees none.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids, with bos prepended exactly when the tokenizer would add it itself."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if adds_bos(tokenizer) else []) + ids


def target_token_ids(tokenizer: Any, target: str, eos: bool = True) -> list[int]:
    """Target ids followed by eos, so the model also learns where the answer stops. A target that
    is not the end of the model's turn (RAT's description alone, which the answer follows) has none."""
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id
    return ids + ([end] if eos and end is not None else [])


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return 0 if pad is None else int(pad)
