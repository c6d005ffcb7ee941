"""Plain causal-LM pretraining of the embedded default on domain text (the "instruct model" stage).

The paper starts from an instruction-tuned Llama that already answers questions; our from-scratch
model first needs to learn the domain's language *and* the FSPO layout (``## Question \\n``,
``## Response \\n``, ``# Example i`` ...), otherwise SFT spends its budget learning to spell. So the
corpus is the domain text plus the same preferences rendered in the template (`template_documents`).
Documents are joined with eos and cut into fixed blocks (standard LM packing).
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from fspo.core.files import atomic_write_json
from fspo.data.schema import Episode, Preference
from fspo.data.template import DescriptionMode, TemplateOptions, render
from fspo.data.tokens import adds_bos


def template_documents(preferences: Iterable[Preference], shots: int = 4, seed: int = 0) -> list[str]:
    """The preferences as text in the FSPO layout: zero-shot Q/A and few-shot prompts + answer.

    The continuation is one of the two answers at random, so pretraining does not already prefer one
    user's taste; few-shot documents show the shots with or without their dispreferred answers, as
    FSPO prompts do.
    """
    rng = random.Random(seed)
    by_user: dict[str, list[Preference]] = defaultdict(list)
    docs: list[str] = []
    seen: set[tuple[str, str, str, str]] = set()
    for p in preferences:
        key = (p.user_id, p.question, p.chosen, p.rejected)
        if key in seen:  # a duplicate could become its own query's shot
            continue
        seen.add(key)
        by_user[p.user_id].append(p)
        answer = rng.choice([p.chosen, p.rejected])  # both styles of answer, no preference signal
        docs.append(
            f"# Task\nGenerate a response to the following question.\n## Question \n{p.question.strip()}\n"
            f"## Response \n{answer.strip()}\n"
        )
    for user, prefs in by_user.items():
        prefs = prefs[:]
        rng.shuffle(prefs)
        for i in range(0, len(prefs) - shots, shots + 1):
            group = prefs[i : i + shots + 1]
            ep = Episode(episode_id=f"pt-{user}-{i}", user_id=user, shots=group[:-1], query=group[-1])
            opts = TemplateOptions(include_dispreferred=rng.random() < 0.5, description=DescriptionMode.NONE)
            r = render(ep, opts)
            docs.append(r.prompt + rng.choice([r.chosen, r.rejected]))
    rng.shuffle(docs)
    return docs


def pack(texts: Sequence[str], tokenizer: Any, block_size: int) -> list[list[int]]:
    """Concatenate tokenized documents (each ended by eos) and cut into `block_size` blocks."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    for t in texts:
        stream.extend(bos + tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def pretrain(
    model_dir: str | Path,
    texts: Sequence[str],
    steps: int = 300,
    lr: float = 2e-3,
    batch_size: int = 16,
    block_size: int = 256,
    warmup: int = 20,
    seed: int = 0,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the model in `model_dir` for `steps` on `texts` (cosine lr), save it back in place.

    Returns a summary (first/last loss, tokens/s) also written to ``fspo_model.json``.
    """
    import shutil

    import torch
    from tqdm.auto import tqdm

    from fspo.core.errors import UserError
    from fspo.models.loading import load_model, load_tokenizer

    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    torch.manual_seed(seed)
    blocks = pack(texts, tokenizer, block_size)
    if not blocks:
        raise UserError(f"the corpus is shorter than one block of {block_size} tokens")
    data = torch.tensor(blocks, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="pretrain", leave=False):
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step % 25 == 0 or step == steps - 1):
            log({"step": step, "loss": losses[-1], "lr": sched.get_last_lr()[0]})
    elapsed = time.perf_counter() - start
    summary = {
        "pretrained": True,
        "steps": steps,
        "first_loss": losses[0],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "tokens_per_s": steps * batch_size * block_size / elapsed,
        "blocks": len(blocks),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    tmp = model_dir.with_name(f".{model_dir.name}.pretrain.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    model.save_pretrained(tmp)
    meta_path = tmp / "fspo_model.json"
    import json

    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    atomic_write_json(meta_path, {**meta, **summary})
    old = model_dir.with_name(f".{model_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    model_dir.rename(old)
    tmp.rename(model_dir)
    shutil.rmtree(old, ignore_errors=True)
    return summary
