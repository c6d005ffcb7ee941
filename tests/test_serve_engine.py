"""The serving engine: served answers equal `fspo eval generate`'s (greedy, sampled, best-of-N), streaming,
the prefix KV cache, limits, and the remote (vLLM-style) backend against the stub server.

The Llama is the tiny default model briefly pretrained on the toy episodes in both layouts (plain and
RAT), so greedy answers are real template continuations that end at a heading; the GPT-2 is random
(any causal LM must serve, and its KV cache is a different class of layers).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from fspo.core.errors import UserError
from fspo.data.schema import Episode
from fspo.data.template import DescriptionMode, TemplateOptions, parse_generation, render
from fspo.eval.generate import generate_for_episodes
from fspo.infer.best_of import SELF, Reference
from fspo.infer.generate import Decoding, Mode, generate_batch, prefill, prompt_ids_for
from fspo.serve.answerers import (
    Answer,
    AnswerRequest,
    LocalAnswerer,
    System,
    local_answerer,
    remote_answerer,
)
from fspo.serve.cache import PrefixCache, kv_bytes
from fspo.serve.references import ServedReference, model_id_of
from fspo.serve.streaming import AnswerStream
from fspo.testing import Reply, serve_openai, toy_episodes, toy_users

RAT_CONFIG = {"include_dispreferred": True, "rat": "target", "chat_template": False}


@pytest.fixture(scope="module")
def users():
    return toy_users(4)


@pytest.fixture(scope="module")
def episodes(users) -> list[Episode]:
    descriptions = {u.user_id: u.description for u in users}
    return [
        e.model_copy(update={"description": descriptions[e.user_id]})
        for e in toy_episodes(users, per_user=4, shots=3)
    ]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_llama_folder, episodes) -> dict[str, Path]:
    """`plain`: the tiny Llama pretrained on the episodes in both layouts; `rat`: the same weights
    with a training config saying RAT (so its default mode is RAT) and that training started from
    `plain`; `gpt2`: a random tiny GPT-2 with the same tokenizer."""
    from transformers import AutoTokenizer

    from fspo.models.pretrain import pretrain
    from fspo.testing import tiny_gpt2

    root = tmp_path_factory.mktemp("serve_engine")
    plain = root / "plain"
    shutil.copytree(tiny_llama_folder, plain)
    rat = TemplateOptions(description=DescriptionMode.TARGET)
    docs = [render(e).prompt + render(e).chosen for e in episodes]
    docs += [render(e, rat).prompt + render(e, rat).chosen for e in episodes]
    pretrain(plain, docs * 4, steps=150, lr=1e-2, batch_size=8, block_size=256)
    rat_dir = root / "rat"
    shutil.copytree(plain, rat_dir)
    (rat_dir / "fspo_config.json").write_text(json.dumps({**RAT_CONFIG, "model": str(plain)}))
    gpt2 = root / "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(plain)
    tiny_gpt2(tokenizer).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    return {"plain": plain, "rat": rat_dir, "gpt2": gpt2}


@pytest.fixture(scope="module")
def backends(model_dirs) -> dict[str, LocalAnswerer]:
    out = {name: local_answerer(path, cache_bytes=64 << 20) for name, path in model_dirs.items()}
    out["plain-nocache"] = local_answerer(model_dirs["plain"], cache_bytes=0)
    out["gpt2-nocache"] = local_answerer(model_dirs["gpt2"], cache_bytes=0)
    return out


def ask(backend, episode: Episode, mode=Mode.PLAIN, **kw) -> tuple[Answer, list[str]]:
    deltas: list[str] = []
    req = AnswerRequest(
        shots=episode.shots, question=episode.query.question, mode=mode, cache_owner=episode.user_id, **kw
    )
    return backend.answer(req, on_text=deltas.append), deltas


# --------------------------------------------------------------------------------------------
# Same answers as evaluation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.PLAIN, Mode.RAT])
def test_served_answer_equals_fspo_generate(backends, episodes, mode):
    backend = backends["plain"]
    chosen = episodes[:6]
    records = generate_for_episodes(
        backend.model, backend.tokenizer, chosen, mode=mode, max_new_tokens=64, batch_size=4
    )
    answers = [ask(backend, e, mode, max_new_tokens=64)[0] for e in chosen]
    assert [a.text for a in answers] == [r["answer"] for r in records]
    assert [a.prompt_tokens for a in answers] == [r["prompt_tokens"] for r in records]
    if mode is Mode.RAT:
        assert [a.description for a in answers] == [r["description"] for r in records]
        assert any(a.description and a.text for a in answers)  # the model writes both parts
    else:
        assert all(a.description is None for a in answers)
        assert all(a.text for a in answers) and all(a.finish_reason == "stop" for a in answers)
    assert [a.finish_reason == "length" for a in answers] == [r["truncated"] for r in records]


def test_same_prompt_ids_and_tokens_as_generate_batch(backends, episodes, model_dirs):
    """Sampled too: the served path is `generate_batch` on the same ids with the same seed."""
    backend = backends["gpt2-nocache"]
    e = episodes[0]
    ids = prompt_ids_for(e.shots, e.query.question, backend.tokenizer, Mode.PLAIN, backend.layout)
    decoding = Decoding(temperature=1.0, top_p=0.9, seed=3)
    new = generate_batch(
        backend.model, backend.tokenizer, [ids], rat=False, max_new_tokens=40, decoding=decoding
    )[0]
    answer, deltas = ask(backend, e, max_new_tokens=40, decoding=decoding)
    assert answer.text == parse_generation(backend.tokenizer.decode(new, skip_special_tokens=True)).answer
    assert answer.completion_tokens == len(new) and answer.prompt_tokens == len(ids)
    assert "".join(deltas) == answer.text


# --------------------------------------------------------------------------------------------
# Sampled decoding, n samples and best-of-N: the same as offline
# --------------------------------------------------------------------------------------------

SAMPLED = Decoding(temperature=1.0, top_p=0.95, repetition_penalty=1.3, no_repeat_ngram_size=3, seed=5)


@pytest.fixture(scope="module")
def trained_dir(model_dirs, tmp_path_factory) -> Path:
    """`plain`'s weights, recorded as trained with β 0.5 from the random GPT-2 (the same tokenizer):
    a training reference that differs from the model itself."""
    folder = tmp_path_factory.mktemp("trained") / "model"
    shutil.copytree(model_dirs["plain"], folder)
    config = {"include_dispreferred": True, "rat": "none", "chat_template": False, "beta": 0.5}
    (folder / "fspo_config.json").write_text(json.dumps({**config, "model": str(model_dirs["gpt2"])}))
    return folder


def _request(e: Episode, decoding: Decoding = SAMPLED, **kw) -> AnswerRequest:
    """The served request of `e`'s question, its seeds keyed by the episode id as offline generation's are."""
    return AnswerRequest(
        e.shots, e.query.question, max_new_tokens=32, decoding=decoding, key=e.episode_id,
        cache_owner=e.user_id, **kw,
    )  # fmt: skip


def test_sampled_served_answer_equals_fspo_generate(backends, episodes):
    backend = backends["plain"]
    chosen = episodes[:6]
    kw = {"max_new_tokens": 32, "batch_size": 4, "options": backend.layout}
    records = generate_for_episodes(backend.model, backend.tokenizer, chosen, decoding=SAMPLED, **kw)
    backend.cache.clear()
    for _ in range(2):  # the prefix cache missed, then hit
        answers = [backend.answer(_request(e)) for e in chosen]
        assert [a.text for a in answers] == [r["answer"] for r in records]
        assert [a.completion_tokens for a in answers] == [r["new_tokens"] for r in records]
    assert answers[-1].cached_tokens > 0
    greedy = generate_for_episodes(backend.model, backend.tokenizer, chosen, **kw)
    assert [r["answer"] for r in greedy] != [r["answer"] for r in records]  # the decoding mattered


@pytest.mark.parametrize("trained", [False, True])
def test_best_of_picks_what_fspo_generate_picks(backends, model_dirs, trained_dir, episodes, trained):
    """best_of N draws the samples offline best-of-N draws, ranks them by the same implicit reward
    (against the model's training reference, or itself without shots), returns the n best, best
    first, and counts every sample's tokens."""
    from fspo.models.loading import load_model

    if trained:
        backend = local_answerer(trained_dir, cache_bytes=64 << 20)
        reference = Reference(load_model(model_dirs["gpt2"]), "gpt2", 0.5)
    else:
        backend, reference = backends["plain"], Reference(None, SELF)
    backend.cache.clear()
    chosen = episodes[:3]
    records = generate_for_episodes(
        backend.model, backend.tokenizer, chosen, max_new_tokens=32, decoding=SAMPLED, best_of=4,
        reference=reference, options=backend.layout,
    )  # fmt: skip
    first = []
    for e, record in zip(chosen, records, strict=True):
        got = backend.choose(_request(e), n=2, best_of=4)
        ranked = sorted(record["candidates"], key=lambda c: -c["reward"])[:2]  # stable: ties in order
        assert [a.text for a in got.answers] == [c["answer"] for c in ranked]
        assert got.answers[0].text == record["answer"]
        assert got.rewards == pytest.approx([c["reward"] for c in ranked], abs=1e-5)
        assert got.rewards[0] >= got.rewards[1] and got.reference == reference.name
        assert (
            got.completion_tokens
            == record["generated_tokens"]
            == sum(c["new_tokens"] for c in record["candidates"])
        )
        assert (got.scored_tokens, got.prompt_tokens) == (record["scored_tokens"], record["prompt_tokens"])
        first.append(got)
    again = backend.choose(_request(chosen[0]), n=2, best_of=4)  # the user's cached prefix feeds it
    assert first[0].cached_tokens == 0 and again.cached_tokens > 0
    assert [a.text for a in again.answers] == [a.text for a in first[0].answers]


def test_n_samples_are_best_ofs_samples_in_order(backends, episodes):
    backend = backends["plain"]
    e = episodes[1]
    (record,) = generate_for_episodes(
        backend.model, backend.tokenizer, [e], max_new_tokens=32, decoding=SAMPLED, best_of=4,
        options=backend.layout,
    )  # fmt: skip
    samples = backend.choose(_request(e), n=3)
    assert [a.text for a in samples.answers] == [c["answer"] for c in record["candidates"][:3]]
    assert samples.answers[0].text == backend.answer(_request(e)).text  # sample 0 is the one answer
    assert samples.completion_tokens == sum(a.completion_tokens for a in samples.answers)
    assert (samples.rewards, samples.reference, samples.scored_tokens) == (None, None, 0)


def test_choose_refuses_what_cannot_be_sampled(backends, episodes):
    backend, e = backends["plain"], episodes[0]
    with pytest.raises(UserError, match=r"^n: 2 samples need temperature > 0"):
        backend.choose(_request(e, Decoding()), n=2)
    with pytest.raises(UserError, match=r"^best_of: 4 samples are plain or oracle answers, not rat"):
        backend.choose(_request(e, mode=Mode.RAT), n=1, best_of=4)
    with pytest.raises(UserError, match=r"^best_of: must be at least n \(3\)"):
        backend.choose(_request(e), n=3, best_of=2)


def test_a_reference_is_found_at_start_and_loaded_once_on_first_use(
    model_dirs, trained_dir, tmp_path, monkeypatch
):
    import fspo.models.loading as loading

    loads: list[str] = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda folder: loads.append(str(folder)) or real(folder))
    known: dict = {}
    first, again = ServedReference.of(trained_dir, known), ServedReference.of(trained_dir, known)
    assert first is again and (first.folder, first.beta, first.name) == (str(model_dirs["gpt2"]), 0.5, "gpt2")
    assert loads == []  # found, not loaded
    assert first.reference("cpu").model is again.reference("cpu").model
    assert loads == [str(model_dirs["gpt2"])]
    untrained = ServedReference.of(model_dirs["plain"]).reference("cpu")
    assert (untrained.model, untrained.name, untrained.beta) == (None, SELF, 1.0)
    # A recorded starting model that is not here is an error when the server starts, naming the field.
    moved = tmp_path / "moved"
    shutil.copytree(trained_dir, moved)
    config = json.loads((moved / "fspo_config.json").read_text())
    (moved / "fspo_config.json").write_text(json.dumps({**config, "model": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="field 'model'"):
        ServedReference.of(moved)


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.PLAIN, Mode.RAT])
def test_streamed_deltas_concatenate_to_the_answer(backends, episodes, mode):
    seen_text = False
    for e in episodes[:8]:
        answer, deltas = ask(backends["plain"], e, mode, max_new_tokens=64)
        assert "".join(deltas) == answer.text
        assert all(deltas)  # no empty deltas
        if mode is Mode.RAT and answer.description:
            assert not any("User Description" in d or answer.description in d for d in deltas)
        assert not any("#" in d for d in deltas)  # no heading ever reaches the client
        seen_text |= len(deltas) > 1
    assert seen_text  # streamed in pieces, not once at the end


def test_an_exception_in_on_text_stops_the_generation(backends, episodes):
    """How a server stops generating for a client that went away: its callback raises."""

    class Gone(Exception):
        pass

    def on_text(delta: str) -> None:
        raise Gone

    e = episodes[0]
    req = AnswerRequest(shots=e.shots, question=e.query.question, max_new_tokens=64)
    with pytest.raises(Gone):
        backends["plain"].answer(req, on_text=on_text)
    assert backends["plain"].answer(req).text  # the model (and its lock) is free again


def _stream_by_token(tokenizer, raw: str) -> tuple[list[str], list[str]]:
    """Feed `raw` token by token as the streamer does; (deltas, what had been sent after each token)."""
    ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
    deltas: list[str] = []
    stream = AnswerStream(deltas.append)
    sent = []
    for k in range(1, len(ids) + 1):
        stream.update(tokenizer.decode(ids[:k], skip_special_tokens=True))
        sent.append(stream.sent)
    stream.finish(parse_generation(tokenizer.decode(ids, skip_special_tokens=True)).answer)
    return deltas, sent


@pytest.mark.parametrize(
    "raw",
    [
        "Get the red hat.\nIt is red.\n# Example 4\n## Question \nWhich",
        "  Get the red hat.  \n\n## Dispreferred Response \nno",
        "## User Description\nloves red.\n## Preferred Response \nGet the red hat.\n\\# not a heading\n# Ex",
        "## User Description\nloves red\n# Example 2\n## Preferred Response \nnever the answer",
        "Un café ☕ rouge, s'il vous plaît.\n#",
    ],
)
def test_answer_stream_never_sends_past_the_cut(model_dirs, raw):
    from fspo.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dirs["plain"])
    final = parse_generation(raw).answer
    deltas, sent = _stream_by_token(tokenizer, raw)
    assert "".join(deltas) == final
    assert all(final.startswith(s) for s in sent)  # never anything that is later cut or changed
    assert "\ufffd" not in "".join(deltas)


# --------------------------------------------------------------------------------------------
# Prefix KV cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain", "gpt2"])
def test_cached_greedy_answers_equal_uncached(backends, episodes, name):
    cached, uncached = backends[name], backends[f"{name}-nocache"]
    cached.cache.clear()
    hits = cached.cache.hits
    shots = episodes[0].shots
    questions = [e.query.question for e in episodes[:4]] + ["Which lamp should I get?", "Any advice?"]
    prefix = cached.prefix_ids(AnswerRequest(shots=shots, question="x"), Mode.PLAIN)
    assert len(prefix) > cached.min_prefix_tokens
    for i, q in enumerate(questions):
        for kw in ({}, {"decoding": Decoding(temperature=1.0, seed=i)}):
            req = AnswerRequest(shots=shots, question=q, max_new_tokens=24, cache_owner="u0", **kw)
            a, b = cached.answer(req), uncached.answer(req)
            assert a.text == b.text and a.completion_tokens == b.completion_tokens
            assert a.finish_reason == b.finish_reason
            assert b.cached_tokens == 0
            assert a.cached_tokens == (0 if i == 0 and not kw else len(prefix))
    assert len(cached.cache) == 1 and cached.cache.hits - hits == 2 * len(questions) - 1


def test_cache_eviction_forget_and_changed_shots(backends, episodes):
    backend = backends["plain"]
    backend.cache.clear()
    one = episodes[0]
    first, _ = ask(backend, one, max_new_tokens=4)
    entry_bytes = backend.cache.bytes
    assert first.cached_tokens == 0 and entry_bytes > 0 and len(backend.cache) == 1
    assert ask(backend, one, max_new_tokens=4)[0].cached_tokens > 0

    # A changed shot set (one answer edited, or one more shot) misses and gets its own entry.
    edited = one.shots[0].model_copy(update={"chosen": one.shots[0].chosen + " Really."})
    for shots in ([edited, *one.shots[1:]], [*one.shots, episodes[1].query]):
        changed = one.model_copy(update={"shots": shots})
        assert ask(backend, changed, max_new_tokens=4)[0].cached_tokens == 0

    # forget drops only that user's entries.
    other = next(e for e in episodes if e.user_id != one.user_id)
    ask(backend, other, max_new_tokens=4)
    backend.forget(one.user_id)
    assert ask(backend, other, max_new_tokens=4)[0].cached_tokens > 0
    assert ask(backend, one, max_new_tokens=4)[0].cached_tokens == 0  # refilled

    # Room for one entry: each new user's prefix evicts the least recently used one.
    backend.cache = PrefixCache(max_bytes=entry_bytes + entry_bytes // 2)
    ask(backend, one, max_new_tokens=4)
    ask(backend, other, max_new_tokens=4)
    assert len(backend.cache) == 1 and backend.cache.evictions == 1
    assert ask(backend, one, max_new_tokens=4)[0].cached_tokens == 0
    assert ask(backend, one, max_new_tokens=4)[0].cached_tokens > 0
    backend.cache = PrefixCache(64 << 20)


def test_prefix_cache_lru_by_bytes(backends, episodes):
    backend = backends["gpt2"]
    kvs = [prefill(backend.model, prompt_ids_for(e.shots, "q", backend.tokenizer)[:40]) for e in episodes[:3]]
    size = kv_bytes(kvs[0])
    assert size == sum(t.nbytes for layer in kvs[0].layers for t in (layer.keys, layer.values)) > 0
    cache = PrefixCache(max_bytes=2 * size)
    cache.put("a", kvs[0], owner="u1")
    cache.put("b", kvs[1], owner="u2")
    assert cache.get("a") is not None  # now "b" is the least recently used
    cache.put("c", kvs[2], owner="u1")
    assert len(cache) == 2 and cache.bytes == 2 * size and cache.evictions == 1
    assert cache.get("b") is None and cache.get("c") is not None  # "b" was evicted, not "a"
    copy = cache.get("a")
    assert copy is not kvs[0] and copy.get_seq_length() == 40
    assert cache.forget("u1") == 2 and len(cache) == 0 and cache.bytes == 0
    assert not PrefixCache(size - 1).put("x", kvs[0])  # larger than the whole budget: not kept
    assert cache.stats() == {
        "entries": 0, "bytes": 0, "max_bytes": 2 * size, "hits": 3, "misses": 1, "evictions": 1
    }  # fmt: skip


def test_a_prefix_too_large_for_the_cache_is_used_without_a_copy(backends, episodes, monkeypatch):
    backend = backends["plain"]
    e = episodes[0]
    req = AnswerRequest(shots=e.shots, question=e.query.question, cache_owner=e.user_id)
    ids = prompt_ids_for(e.shots, e.query.question, backend.tokenizer, Mode.PLAIN, backend.layout)
    import fspo.serve.answerers as answerers

    prefilled = []

    def spy(model, prefix):
        prefilled.append(prefill(model, prefix))
        return prefilled[-1]

    monkeypatch.setattr(answerers, "prefill", spy)
    monkeypatch.setattr(backend, "cache", PrefixCache(max_bytes=1))  # refuses every entry
    kv, cached = backend._prefix_kv(req, Mode.PLAIN, ids)
    assert kv is prefilled[-1] and cached == 0 and len(backend.cache) == 0
    monkeypatch.setattr(backend, "cache", PrefixCache(max_bytes=64 << 20))  # keeps it: hands out a copy
    kv, cached = backend._prefix_kv(req, Mode.PLAIN, ids)
    assert kv is not prefilled[-1] and kv.get_seq_length() == prefilled[-1].get_seq_length()
    assert len(backend.cache) == 1


def test_model_id_names_the_run_of_a_model_folder(backends, tmp_path):
    assert model_id_of("runs/quickstart/fspo/model") == "fspo"
    assert model_id_of(tmp_path / "sft_rat" / "model") == "sft_rat"
    assert model_id_of(tmp_path / "my-model") == "my-model"
    assert backends["plain"].model_id == "plain"


def test_no_cache_without_shots_or_for_short_prefixes(backends, episodes):
    backend = backends["plain"]
    backend.cache.clear()
    e = episodes[0].model_copy(update={"shots": []})
    assert [ask(backend, e, max_new_tokens=4)[0].cached_tokens for _ in range(2)] == [0, 0]
    assert len(backend.cache) == 0


# --------------------------------------------------------------------------------------------
# Modes, limits, threads
# --------------------------------------------------------------------------------------------


def test_default_mode_from_the_trained_layout(backends):
    assert backends["plain"].default_mode is Mode.PLAIN
    assert backends["rat"].default_mode is Mode.RAT
    assert System("fspo", backends["rat"]).served_mode is Mode.RAT
    assert System("plain", backends["rat"], mode=Mode.PLAIN).served_mode is Mode.PLAIN


def test_limits_and_bad_requests_are_user_errors(backends, episodes):
    backend = backends["gpt2"]  # 512 positions
    e = episodes[0]
    assert backend.max_new_tokens_limit == 511
    many = [s for x in episodes for s in x.shots][:12]
    with pytest.raises(UserError, match="context of 512 tokens"):
        backend.answer(AnswerRequest(shots=many, question="Which hat should I get?"))
    with pytest.raises(UserError, match="max_new_tokens"):
        backend.answer(AnswerRequest(shots=e.shots, question="q", max_new_tokens=512))
    with pytest.raises(UserError, match="question"):
        backend.answer(AnswerRequest(shots=e.shots, question="  "))
    with pytest.raises(UserError, match="description"):
        backend.answer(AnswerRequest(shots=e.shots, question="q", mode=Mode.ORACLE))
    # Near the end of the context the budget shrinks to what is left, and the answer is cut short.
    near = [s for x in episodes for s in x.shots][:6]
    n_prompt = len(prompt_ids_for(near, "Which hat?", backend.tokenizer))
    assert 400 < n_prompt < 500
    answer = backend.answer(AnswerRequest(shots=near, question="Which hat?", max_new_tokens=200))
    assert answer.completion_tokens == 512 - n_prompt and answer.finish_reason == "length"


def test_oracle_mode_puts_the_description_in_the_prompt(backends, episodes):
    e = episodes[0]
    answer, _ = ask(backends["plain"], e, Mode.ORACLE, description=e.description, max_new_tokens=8)
    plain, _ = ask(backends["plain"], e, Mode.PLAIN, max_new_tokens=8)
    assert answer.prompt_tokens > plain.prompt_tokens and answer.description is None


def test_concurrent_requests_match_sequential(backends, episodes):
    backend = backends["plain"]
    chosen = episodes[:8]
    expected = [ask(backend, e, max_new_tokens=16)[0].text for e in chosen]
    got: dict[int, str] = {}

    def worker(i: int) -> None:
        got[i] = ask(backend, chosen[i], max_new_tokens=16)[0].text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(chosen))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(chosen))] == expected


# --------------------------------------------------------------------------------------------
# Remote backend (vLLM/SGLang-style /v1/completions) against the stub server
# --------------------------------------------------------------------------------------------

RAT_REPLY = (
    "## User Description\nThis user loves the colour red.\n"
    "## Preferred Response \nGet the red hat, it suits you.\n# Example 4\n## Question \n"
    + " ".join(f"w{i}" for i in range(300))
)


def test_remote_answerer_sends_the_local_prompt_ids_and_cuts_the_stream(model_dirs, episodes):
    e = episodes[0]
    with serve_openai(lambda body: Reply(RAT_REPLY, chunk_delay=0.005)) as server:
        backend = remote_answerer(server.base_url, model_dirs["rat"], remote_model="served-fspo")
        assert backend.default_mode is Mode.RAT
        deltas: list[str] = []
        req = AnswerRequest(
            e.shots, e.query.question, Mode.RAT, max_new_tokens=100, decoding=Decoding(seed=7)
        )
        answer = backend.answer(req, on_text=deltas.append)
    local = prompt_ids_for(e.shots, e.query.question, backend.tokenizer, Mode.RAT, backend.layout)
    body = server.requests[0]
    assert body["prompt"] == local
    assert (body["model"], body["max_tokens"], body["seed"], body["stream"]) == ("served-fspo", 100, 7, True)
    assert answer.text == "Get the red hat, it suits you."
    assert answer.description == "This user loves the colour red."
    assert "".join(deltas) == answer.text and answer.finish_reason == "stop"
    assert answer.prompt_tokens == len(local) and answer.cached_tokens == 0
    assert server.chunks_sent[0] < 300  # closed once the answer was finished, not read to the end
    # RAT writes headings itself: no stop string, so closing early is what ends the generation.
    assert "stop" not in body and body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("mode", [Mode.PLAIN, Mode.ORACLE])
def test_remote_answerer_stops_at_the_heading_and_reports_cached_tokens(model_dirs, episodes, mode):
    """A plain or oracle answer ends at the next heading, so the server is told to stop there: the stream
    then runs to its usage chunk, and the server's prefix-cache hits become `Answer.cached_tokens`."""
    e = episodes[1]
    text = "Get the blue hat.\n# Example 4\n## Question \n" + " ".join(f"w{i}" for i in range(300))
    with serve_openai(lambda body: Reply(text, usage=(999, 6), cached_tokens=57)) as server:
        backend = remote_answerer(server.base_url, model_dirs["plain"], remote_model="m")
        answer, deltas = ask(backend, e, mode, description=e.description, max_new_tokens=300)
    body = server.requests[0]
    assert body["stop"] == ["\n#"] and body["stream_options"] == {"include_usage": True}
    assert (answer.text, answer.finish_reason, "".join(deltas)) == ("Get the blue hat.", "stop", answer.text)
    assert answer.cached_tokens == 57 and answer.completion_tokens == 6  # the server's usage
    assert answer.prompt_tokens == len(body["prompt"])
    assert server.chunks_sent == [4]  # the server ended the answer, not a closed connection


def test_remote_answerer_gives_one_answer_of_its_servers_decoding(model_dirs, episodes):
    """No best-of-N (the log-probabilities are the remote server's) and no repetition controls (vLLM's
    penalty counts the prompt too): both refused before any request is sent."""
    backend = remote_answerer("http://127.0.0.1:9/v1", model_dirs["plain"], remote_model="m")
    assert backend.max_samples == 1
    with pytest.raises(UserError, match="n, best_of"):
        backend.choose(_request(episodes[0]), n=1, best_of=2)
    with pytest.raises(UserError, match="repetition penalty 1.3"):
        backend.answer(_request(episodes[0]))


def test_remote_answerer_plain_and_length(model_dirs, episodes):
    e = episodes[1]
    done_reply = Reply("Get the blue hat.\n## Dispreferred Response \nx")
    replies = iter([done_reply, Reply("Get the", finish_reason="length")])
    with serve_openai(lambda body: next(replies)) as server:
        backend = remote_answerer(server.base_url, model_dirs["plain"], remote_model="m", model_id="fspo")
        assert backend.model_id == "fspo" and backend.default_mode is Mode.PLAIN
        done, deltas = ask(backend, e, max_new_tokens=20)
        cut, _ = ask(backend, e, max_new_tokens=2)
    assert server.requests[0]["prompt"] == prompt_ids_for(e.shots, e.query.question, backend.tokenizer)
    assert (done.text, done.finish_reason, done.description) == ("Get the blue hat.", "stop", None)
    assert "".join(deltas) == done.text
    assert (cut.text, cut.finish_reason) == ("Get the", "length")
