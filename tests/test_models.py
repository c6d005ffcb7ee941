"""The embedded default model: tokenizer, model folder round trip, pretraining, clear loading errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fspo.core.errors import UserError
from fspo.models.default import init_model, read_corpus
from fspo.models.loading import load_model, load_tokenizer
from fspo.models.pretrain import pack, pretrain, template_documents
from fspo.testing import toy_episodes, toy_users


def test_init_makes_a_plain_hf_folder(tmp_path: Path, toy_texts: list[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = init_model(tmp_path / "m", toy_texts, size="tiny")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    assert tok.bos_token and tok.eos_token and tok.pad_token
    ids = tok("## Question \nWhich red hat?\n")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "## Question \nWhich red hat?\n"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|assistant|>\n") and "hi" in chat
    assert not (tmp_path / ".m.tmp").exists()


def test_pretrain_lowers_loss_and_keeps_folder_loadable(tmp_path: Path, toy_texts: list[str]) -> None:
    folder = init_model(tmp_path / "m", toy_texts, size="tiny")
    summary = pretrain(folder, toy_texts, steps=30, lr=3e-3, batch_size=4, block_size=64)
    assert summary["final_loss"] < summary["first_loss"] - 1.0
    assert load_model(folder) is not None and load_tokenizer(folder) is not None


def test_template_documents_use_the_fspo_layout() -> None:
    prefs = [p for e in toy_episodes(toy_users(2), 3, shots=2) for p in [*e.shots, e.query]]
    docs = template_documents(prefs, shots=2)
    assert any("## Response \n" in d for d in docs) and any("# Example 1\n" in d for d in docs)


def test_pack_blocks(tiny_llama_folder: Path, toy_texts: list[str]) -> None:
    tok = load_tokenizer(tiny_llama_folder)
    blocks = pack(toy_texts[:20], tok, 32)
    assert blocks and all(len(b) == 32 for b in blocks)


def test_unknown_model_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="neither a local model folder nor available offline"):
        load_model("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a loadable"):
        load_tokenizer(tmp_path / "empty")


def test_corpus_file_and_bad_size(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("first doc\nline two\n\nsecond doc\n")
    assert read_corpus(tmp_path / "c.txt") == ["first doc\nline two", "second doc"]
    with pytest.raises(UserError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="unknown model size"):
        init_model(tmp_path / "x", ["a b c"], size="huge")  # type: ignore[arg-type]
