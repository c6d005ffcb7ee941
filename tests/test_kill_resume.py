"""`fspo generate` and `fspo eval accuracy` killed (SIGKILL) mid-run and run again end with the same file,
byte for byte, as a run that was never interrupted: both resume from their `.partial` append log.

The subprocess tests kill a real CLI process once its log holds a whole record; the in-process tests
cut a log's last line mid-record (what a kill during a write leaves) and check the line is redone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_llama_dir, write_jsonl
from fspo.core.errors import UserError
from fspo.eval.accuracy import accuracy_curve, pair_margins
from fspo.eval.generate import generate_for_episodes, partial_path
from fspo.infer.generate import Decoding
from fspo.testing import toy_corpus, toy_episodes, toy_users

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
FSPO = [sys.executable, "-c", "from fspo.cli import main; main()"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 test episodes (3 shots each) and two tiny Llamas that differ (policy and reference)."""
    root = tmp_path_factory.mktemp("kill_resume")
    users = toy_users(8)
    seen = {u.user_id for u in users[::2]}
    eps = [
        e.model_copy(update={"split": "test_seen" if e.user_id in seen else "test_unseen"})
        for e in toy_episodes(users, per_user=5, shots=3)
    ]
    corpus = toy_corpus(eps)
    return {
        "episodes": write_jsonl(root / "episodes.jsonl", eps),
        "model": _roughen(tiny_llama_dir(root / "policy", corpus * 3)),
        # The same tokenizer (a reference must read the policy's token ids) and the policy's weights
        # before `_roughen`: the two models differ.
        "ref": tiny_llama_dir(root / "ref", corpus * 3),
    }


def _roughen(folder: Path) -> Path:
    """Add noise to a freshly initialised model's weights: its small initial weights answer every
    prompt with the same greedy text, which would make 'byte-identical' prove little."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.3)
    model.save_pretrained(folder)
    return folder


def _has_a_line(path: Path) -> bool:
    try:
        return b"\n" in path.read_bytes()
    except FileNotFoundError:
        return False


def _kill_once_logged(command: list[str], out: Path) -> None:
    """Start `command`; SIGKILL it once `out`'s `.partial` log holds a whole record (it must not finish)."""
    log = partial_path(out)
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while not _has_a_line(log):
            if proc.poll() is not None:
                pytest.fail(
                    f"finished before the kill; make it longer: {proc.stderr.read().decode()[-2000:]}"
                )
            assert time.monotonic() < deadline, "no record logged"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()  # no-op once it is dead; never leave it running when the test fails
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "killed too late: the run had finished"


def _run(command: list[str]) -> str:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _kill_then_resume(tmp_path: Path, command: list[str]) -> tuple[bytes, bytes]:
    """(uninterrupted output, killed-and-rerun output) of `command`, which ends in `--out`."""
    straight, killed = tmp_path / "straight" / "out", tmp_path / "killed" / "out"
    _run([*command, str(straight)])
    _kill_once_logged([*command, str(killed)], killed)
    logged = partial_path(killed).read_bytes()
    output = _run([*command, str(killed)])
    assert "resuming" in output
    assert not partial_path(killed).exists() and not partial_path(straight).exists()
    assert logged.count(b"\n") >= 1  # there was work to keep
    return straight.read_bytes(), killed.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_generate_killed_and_rerun_is_byte_identical(world, tmp_path: Path, temperature: float) -> None:
    command = [*FSPO, "generate", "--model", str(world["model"]), "--episodes", str(world["episodes"]),
               "--max-new-tokens", "48", "--batch-size", "1", "--temperature", str(temperature),
               "--top-p", "0.9", "--seed", "5", "--out"]  # fmt: skip
    straight, resumed = _kill_then_resume(tmp_path, command)
    assert resumed == straight
    rows = [json.loads(line) for line in straight.splitlines()]
    assert len(rows) == 40 and len({r["raw"] for r in rows}) > 1  # real, varied generations


@pytest.mark.slow
def test_accuracy_killed_and_rerun_is_byte_identical(world, tmp_path: Path) -> None:
    command = [*FSPO, "eval", "accuracy", "--model", str(world["model"]), "--ref", str(world["ref"]),
               "--episodes", str(world["episodes"]), "--shots", "0,1,2,3", "--batch-size", "1",
               "--out"]  # fmt: skip
    straight, resumed = _kill_then_resume(tmp_path, command)
    assert resumed == straight
    points = [p for split in json.loads(straight)["splits"].values() for p in split]
    assert {p["n"] for p in points} == {20} and len({p["accuracy"] for p in points}) > 1


# In process: a log whose last line a kill cut mid-write.


def test_generate_redoes_a_torn_last_line(eval_episodes, eval_lm, tmp_path: Path) -> None:
    model, tok = eval_lm
    kw = {"max_new_tokens": 8, "decoding": Decoding(temperature=1.0, top_p=0.9, seed=2), "batch_size": 3}
    whole = tmp_path / "whole.jsonl"
    generate_for_episodes(model, tok, eval_episodes, out=whole, **kw)
    lines = whole.read_bytes().splitlines(keepends=True)
    out = tmp_path / "cut.jsonl"
    # Batches of 3: a whole batch and one record of the next are logged, then a record torn mid-line.
    partial_path(out).write_bytes(b"".join(lines[:5])[:-7])
    calls = []
    original = model.generate

    def counting(*a, **k):
        calls.append(k["input_ids"].shape[0])
        return original(*a, **k)

    model.generate = counting
    try:
        generate_for_episodes(model, tok, eval_episodes, out=out, **kw)
    finally:
        del model.generate
    assert out.read_bytes() == whole.read_bytes() and not partial_path(out).exists()
    assert calls == [3, 2]  # the first batch kept; the second (cut part-way) decoded again whole


def test_generate_refuses_a_log_that_is_not_its_own(eval_episodes, eval_lm, tmp_path: Path) -> None:
    model, tok = eval_lm
    out = tmp_path / "gen.jsonl"
    partial_path(out).write_text('{"episode_id": "x"}\n["not", "a", "record"]\n')
    with pytest.raises(UserError, match=r"gen\.jsonl\.partial:1: generated with other settings"):
        generate_for_episodes(model, tok, eval_episodes, out=out, max_new_tokens=4)


def test_accuracy_batches_are_the_ones_score_pairs_forms(eval_episodes, eval_lm) -> None:
    """Scoring batch by batch (what makes the log possible) gives one `score_pairs` call's numbers."""
    from fspo.data.template import render
    from fspo.infer.logps import score_pairs

    model, tok = eval_lm
    rendered = [render(e.model_copy(update={"shots": e.shots[:2]}), None, tok) for e in eval_episodes]
    fields = [[r.prompt for r in rendered], [r.chosen for r in rendered], [r.rejected for r in rendered]]
    chosen, rejected = score_pairs(model, tok, *fields, batch_size=3)
    expected = [float(c) - float(r) for c, r in zip(chosen, rejected, strict=True)]
    assert pair_margins(model, tok, eval_episodes, 2, batch_size=3) == expected


def test_accuracy_log_redoes_a_torn_line_and_refuses_other_settings(
    eval_episodes, eval_lm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fspo.infer import logps

    model, tok = eval_lm
    log = tmp_path / "acc.json.partial"
    kw = {"shots": [0, 1, 3], "batch_size": 3, "model_name": "m"}
    straight = accuracy_curve(model, tok, eval_episodes, log=tmp_path / "straight.partial", **kw)
    lines = (tmp_path / "straight.partial").read_bytes().splitlines(keepends=True)
    assert json.loads(lines[0])["kind"] == "fspo.accuracy.log" and len(lines) > 4
    log.write_bytes(b"".join(lines[:4])[:-3])  # header, two whole batches, the third torn
    scored = []
    original = logps.score_pairs

    def counting(model, tokenizer, prompts, *rest, **kw):
        scored.append(len(prompts))
        return original(model, tokenizer, prompts, *rest, **kw)

    monkeypatch.setattr(logps, "score_pairs", counting)
    resumed = accuracy_curve(model, tok, eval_episodes, log=log, **kw)
    assert json.dumps(resumed) == json.dumps(straight)
    assert len(scored) == len(lines) - 1 - 2  # every batch but the two kept
    assert log.read_bytes().splitlines(keepends=True) == lines  # the torn line redone, whole
    with pytest.raises(UserError, match="other settings"):
        accuracy_curve(model, tok, eval_episodes, log=log, **{**kw, "batch_size": 2})
