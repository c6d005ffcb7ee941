"""The local transformers backend runs the pipeline on a tiny random Llama (garbage text, real mechanics).

Also: embedding spread in `fspo synth stats` with a tiny random BERT encoder.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from fspo.llm import BackendConfig, LLMClient
from fspo.llm.backends.hf_local import TransformersBackend
from fspo.synth.config import SynthConfig
from fspo.synth.pipeline import run_pipeline
from fspo.synth.stats import synth_stats
from fspo.testing import tiny_llama

CORPUS = ["You are a person who likes short answers.", '{"description": "x", "preferred": "A"}',
          "Write a review of the movie. Answer A. Answer B. Which answer do you prefer?"] * 20  # fmt: skip


def _tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]"]
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer `tiny_llama` on `_tokenizer`, saved with it: a model folder the backend loads."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = _tokenizer(folder)
    model = tiny_llama(len(tok), num_hidden_layers=1, num_attention_heads=2,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    model.save_pretrained(folder)
    return folder


def test_transformers_backend_batches_prompts(llama_folder: Path) -> None:
    cfg = BackendConfig(
        kind="transformers", model=str(llama_folder), max_tokens=6, batch_size=4, temperature=0
    )
    backend = TransformersBackend(cfg)

    async def go() -> list:
        client = LLMClient(backend, cfg)
        try:
            msgs = [[{"role": "user", "content": f"question {i}"}] for i in range(10)]
            return await asyncio.gather(*(client.complete("x", m) for m in msgs))
        finally:
            await client.aclose()

    out = asyncio.run(go())
    assert len(out) == 10 and max(backend.batch_sizes) == 4 and sum(backend.batch_sizes) == 10
    assert all(0 < c.completion_tokens <= 6 and c.prompt_tokens > 0 for c in out)
    # Batched (left-padded) generation equals one-by-one generation, greedy.
    single = TransformersBackend(cfg.model_copy(update={"batch_size": 1}))
    alone = asyncio.run(LLMClient(single, cfg).complete("x", [{"role": "user", "content": "question 3"}]))
    assert alone.text == out[3].text


def test_pipeline_on_local_model_counts_failures(llama_folder: Path, tmp_path: Path) -> None:
    raw = {
        "name": "local", "domain": "movies", "seed": 0,
        "backend": {"kind": "transformers", "model": str(llama_folder), "max_tokens": 8, "batch_size": 4,
                    "max_concurrency": 8, "max_reasks": 1, "temperature": 0},
        "traits": {"given": [{"name": "tone", "values": ["dry", "warm"]}]},
        "personas": {"count": 4},
        "questions": {"domains": [{"name": "m", "description": "movies", "questions": ["Q1?", "Q2?"]}]},
        "answers": {"views_per_question": 2},
    }  # fmt: skip
    cfg = SynthConfig.model_validate(raw)
    backend = TransformersBackend(cfg.backend)
    client = LLMClient(backend, cfg.backend)
    result = run_pipeline(cfg, out=tmp_path / "out", progress=False, client=client)
    # Random weights write no JSON: every persona and every question's viewpoints fail after one re-ask.
    assert result["stages"]["personas"]["status"] == {"failed": 4}
    assert result["stages"]["answers"]["status"] == {"failed": 2}
    stats = result["client"]
    assert stats["parse_failures"] == 6 and stats["reasks"] == 6 and stats["sent"] == 12
    assert stats["completion_tokens"] > 0 and max(backend.batch_sizes) > 1
    assert result["stages"]["export"] == {"users": 0, "preferences": 0}
    personas = [
        json.loads(x) for x in (tmp_path / "out" / "personas" / "personas.jsonl").read_text().splitlines()
    ]
    assert all("no usable reply" in p["error"] for p in personas)


def test_embedding_spread_with_a_local_encoder(tmp_path: Path) -> None:
    enc = tmp_path / "enc"
    tok = _tokenizer(enc)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(enc)  # fmt: skip
    run = tmp_path / "run"
    for sub, rows in {
        "personas/personas.jsonl": [
            {"status": "ok", "description": d} for d in ("You like A.", "You like B.")
        ],
        "questions/questions.jsonl": [{"question": "Q one?"}, {"question": "Q one?"}],
        "answers/answers.jsonl": [{"answers": ["short answer", "a much longer and different answer", None]}],
        "labels/labels.jsonl": [],
    }.items():
        (run / sub).parent.mkdir(parents=True, exist_ok=True)
        (run / sub).write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = synth_stats(run, embedding_model=str(enc))
    assert res["diversity"]["questions"]["embedding_spread"] == pytest.approx(
        0.0, abs=1e-5
    )  # identical texts
    assert res["diversity"]["answers"]["embedding_spread"] > 0.0
    assert res["consistency"] is None and res["labels"] == {}
