"""A Hugging Face causal LM run in-process, with batched generation.

Requests arrive one by one from many coroutines (the same way as for an HTTP server); a small
batcher gathers up to `batch_size` of them and generates them together in a worker thread, so the
event loop keeps feeding it while the model runs. Prompts are left-padded (decoder-only models
continue from the right end). A tokenizer without a chat template gets a plain "System/User/
Assistant" layout, so any causal LM works, instruction-tuned or not.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fspo.core.errors import UserError
from fspo.llm.backends import Completion, Messages
from fspo.llm.config import BackendConfig


def _plain_chat(messages: Messages) -> str:
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"


class TransformersBackend:
    def __init__(self, cfg: BackendConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.model = cfg.resolved_model()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model)
            dtype = getattr(torch, cfg.dtype)
            self.lm = AutoModelForCausalLM.from_pretrained(self.model, dtype=dtype).to(cfg.device).eval()
        except (OSError, ValueError) as err:
            raise UserError(f"backend.model: cannot load {self.model!r} as a causal LM: {err}") from err
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self._queue: asyncio.Queue[tuple[Messages, dict[str, Any], asyncio.Future[Completion]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # observed, for tests and stats

    def _render(self, messages: Messages) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _plain_chat(messages)

    def _generate(self, batch: list[tuple[Messages, dict[str, Any]]]) -> list[Completion]:
        import torch

        params = batch[0][1]
        texts = [self._render(m) for m, _ in batch]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.cfg.device)
        sample = params["temperature"] > 0
        if params.get("seed") is not None:
            torch.manual_seed(params["seed"])
        with torch.no_grad():
            out = self.lm.generate(
                **enc,
                max_new_tokens=params["max_tokens"],
                do_sample=sample,
                temperature=params["temperature"] if sample else None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        results = []
        for i in range(len(batch)):
            ids = new[i]
            if self.tokenizer.eos_token_id is not None:
                stops = (ids == self.tokenizer.eos_token_id).nonzero()
                if len(stops):
                    ids = ids[: int(stops[0])]
            ids = ids[ids != self.tokenizer.pad_token_id]
            results.append(
                Completion(
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    prompt_tokens=int(enc["attention_mask"][i].sum()),
                    completion_tokens=len(ids),
                )
            )
        return results

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            items = [await self._queue.get()]
            await asyncio.sleep(0)  # let the coroutines that are ready enqueue too
            while len(items) < self.cfg.batch_size and not self._queue.empty():
                items.append(self._queue.get_nowait())
            self.batch_sizes.append(len(items))
            try:
                results = await asyncio.to_thread(self._generate, [(m, p) for m, p, _ in items])
            except Exception as err:  # a failed batch fails its requests, not the batcher
                for _, _, fut in items:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, _, fut), res in zip(items, results, strict=True):
                if not fut.done():
                    fut.set_result(res)

    async def complete(self, messages: Messages, params: dict[str, Any]) -> Completion:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        fut: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        await self._queue.put((messages, params, fut))
        return await fut

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
            self._queue = None
