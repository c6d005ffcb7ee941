"""The blind study: its report (participant bootstrap), its routes end to end, simulated participants over
HTTP, and the `fspo study` commands."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import run_typer, write_jsonl
from fspo.core.errors import UserError
from fspo.eval.stats import wilson_interval
from fspo.infer.generate import Mode
from fspo.serve.answerers import Answer, System
from fspo.serve.app import create_app
from fspo.serve.errors import APIError
from fspo.serve.store import Store
from fspo.serve.study import StudyConfig
from fspo.serve.study_report import participant_interval, summarize_trials
from fspo.serve.throttle import Throttle
from fspo.testing import COLOURS, toy_preferences, toy_reward_for, toy_users


def _trial(participant, question, vote, fspo_left=True):
    left, right = ("fspo", "base") if fspo_left else ("base", "fspo")
    return SimpleNamespace(
        participant=participant, question=question, left_system=left, right_system=right, vote=vote
    )


def _won(participant, question, outcome, fspo_left):
    """A voted trial whose outcome for FSPO is `outcome` ('win', 'tie', 'loss'), FSPO on the left or not."""
    if outcome == "tie":
        return _trial(participant, question, "tie", fspo_left)
    fspo_side = "left" if fspo_left else "right"
    other = "right" if fspo_left else "left"
    return _trial(participant, question, fspo_side if outcome == "win" else other, fspo_left)


# ------------------------------------------------------------------------------------------- report
def test_report_counts_ties_half_and_checks_position_bias():
    outcomes = ["win", "win", "tie", "loss"]  # per participant: 2.5 of 4
    trials = [
        _won(f"p{p}", f"q{i}", outcome, fspo_left=(p + i) % 2 == 0)
        for p in range(10)
        for i, outcome in enumerate(outcomes)
    ]
    trials.append(_trial("p0", "q9", None))  # not voted yet: not counted
    trials.append(
        SimpleNamespace(participant="p0", question="q8", left_system="x", right_system="y", vote="left")
    )
    rep = summarize_trials(trials, "fspo", "base", resamples=2000, seed=1)

    assert (rep.trials, rep.unvoted, rep.participants) == (40, 1, 10)
    assert (rep.fspo_wins, rep.ties, rep.baseline_wins) == (20, 10, 10)
    assert rep.win_rate == pytest.approx(25 / 40)
    # Every participant has the same rate, so no resample can move it.
    assert (rep.ci_low, rep.ci_high) == (pytest.approx(0.625), pytest.approx(0.625))
    # Left votes: a win with FSPO left or a loss with FSPO right; ties are left out of the share.
    left = sum(t.vote == "left" for t in trials[:40])
    assert (rep.left_votes, rep.right_votes) == (left, 30 - left)
    assert rep.left_share == pytest.approx(left / 30)
    by_q = {q.question: q for q in rep.per_question}
    assert (by_q["q2"].n, by_q["q2"].ties, by_q["q2"].win_rate) == (10, 10, 0.5)
    assert (by_q["q3"].fspo_wins, by_q["q3"].baseline_wins, by_q["q3"].win_rate) == (0, 10, 0.0)


def test_interval_resamples_participants_not_trials():
    # One participant who loves FSPO and votes a lot; nine who prefer the baseline, twice each.
    trials = [_won("fan", f"q{i}", "win", i % 2 == 0) for i in range(100)]
    trials += [_won(f"p{p}", f"q{i}", "loss", i % 2 == 0) for p in range(9) for i in range(2)]
    rep = summarize_trials(trials, "fspo", "base", resamples=4000, seed=0)
    assert rep.win_rate == pytest.approx(100 / 118)
    assert rep.ci_low <= rep.win_rate <= rep.ci_high

    # Counting every vote as independent (each its own participant) gives about Wilson's narrow interval.
    alone = [SimpleNamespace(**{**vars(t), "participant": f"t{i}"}) for i, t in enumerate(trials)]
    independent = summarize_trials(alone, "fspo", "base", resamples=4000, seed=0)
    lo, hi = wilson_interval(100, 118)
    assert independent.ci_high - independent.ci_low == pytest.approx(hi - lo, rel=0.35)
    # By people, the 100 votes of one person weigh as one person: the interval is far wider.
    assert rep.ci_high - rep.ci_low > 3 * (hi - lo)
    assert rep.ci_low < 0.5  # nine of ten people preferred the baseline


def test_interval_is_seeded_and_covers_a_known_rate():
    import numpy as np

    rng = np.random.default_rng(7)
    counts = rng.integers(3, 12, size=40)
    sums = np.array([rng.binomial(n, 0.7) for n in counts], dtype=float)
    a = participant_interval(sums, counts, resamples=3000, seed=3)
    assert a == participant_interval(sums, counts, resamples=3000, seed=3)
    assert a != participant_interval(sums, counts, resamples=3000, seed=4)
    assert a[0] < sums.sum() / counts.sum() < a[1]
    assert a[0] < 0.7 < a[1]
    assert all(math.isnan(x) for x in participant_interval([3.0], [4]))  # one person: no interval
    alone = summarize_trials([_trial("p", "q", "tie")], "fspo", "base")
    assert (alone.ci_low, alone.ci_high, alone.left_share) == (None, None, None)  # JSON null, not NaN


def test_report_errors_are_user_errors():
    with pytest.raises(UserError, match="no study trials"):
        summarize_trials([], "fspo", "base")
    with pytest.raises(UserError, match="none has a vote"):
        summarize_trials([_trial("p", "q", None)], "fspo", "base")
    with pytest.raises(UserError, match="the trials hold: fspo vs base"):
        summarize_trials([_trial("p", "q", "left")], "fspo", "population-ipo")


# ------------------------------------------------------------------------------------------- config
def _study_files(folder: Path, prefs, questions, **fields) -> Path:
    write_jsonl(folder / "pairs.jsonl", prefs)
    (folder / "questions.txt").write_text("\n".join(questions) + "\n")
    study = {
        "code": "letmein",
        "pairs": "pairs.jsonl",
        "label_count": 4,
        "questions": "questions.txt",
        "trials_per_participant": 3,
        "fspo": "fspo",
        "baseline": "base",
        "seed": 0,
        "max_new_tokens": 16,
        **fields,
    }
    (folder / "study.yaml").write_text(yaml.safe_dump(study))
    return folder / "study.yaml"


QUESTIONS = [f"Which {t} would suit me?" for t in ("coat", "hat", "car", "wall", "cup")]


@pytest.fixture
def study_file(tmp_path):
    return _study_files(tmp_path, toy_preferences(toy_users(4), per_user=3), QUESTIONS)


def test_study_config_draws_are_per_participant_and_seeded(study_file):
    study = StudyConfig.load(study_file)
    assert study.pairs == study_file.parent / "pairs.jsonl"  # relative to the study file
    assert len(study.bank) == 12 and study.question_bank == QUESTIONS
    a = study.pairs_for("alice")
    assert a == study.pairs_for("alice") and a != study.pairs_for("bob")
    assert len({p["pair_id"] for p in a}) == len(a) == 8  # 4 to label, then 4 spares
    for p in a:  # the pair's two answers, in a drawn order
        pair = study.bank[p["pair_id"]]
        assert {p["a"], p["b"]} == {pair.chosen, pair.rejected} and p["question"] == pair.question
    qs = study.questions_for("alice")
    assert len(set(qs)) == 3 and qs == study.questions_for("alice")
    sides = [study.fspo_on_left(f"p{i}", q) for i in range(100) for q in QUESTIONS]
    assert 0.4 < sum(sides) / len(sides) < 0.6
    assert sides == [study.fspo_on_left(f"p{i}", q) for i in range(100) for q in QUESTIONS]
    other_seed = study.model_copy(update={"seed": 1})
    assert [other_seed.fspo_on_left(f"p{i}", q) for i in range(100) for q in QUESTIONS] != sides


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label_count": 13}, "label_count 13: the bank"),
        ({"trials_per_participant": 6}, "5 distinct questions"),
        ({"baseline": "fspo"}, "a study compares two systems"),
        ({"label_count": 0}, "label_count: Input should be greater than or equal to 1"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"pairs": "nowhere.jsonl"}, "nowhere.jsonl"),
    ],
)
def test_study_config_errors_name_the_field(tmp_path, change, message):
    file = _study_files(tmp_path, toy_preferences(toy_users(4), per_user=3), QUESTIONS, **change)
    with pytest.raises(UserError, match=message):
        StudyConfig.load(file)
    study = StudyConfig.load(_study_files(tmp_path, toy_preferences(toy_users(4), per_user=3), QUESTIONS))
    with pytest.raises(UserError, match="study baseline: system 'base' is not served"):
        study.check_systems(["fspo", "other"])


# ------------------------------------------------------------------------------------------- routes
@dataclass
class ColourBackend:
    """The toy world's ideal FSPO: names the colour the shots' preferred answers name most (or `fixed`)."""

    fixed: str | None = None
    text: str | None = None  # answer this instead
    model_id: str = "colour"
    max_new_tokens_limit: int = 64
    max_samples: int | None = 1  # one answer a request: no n / best_of
    default_mode: Mode = Mode.PLAIN
    calls: list = field(default_factory=list)

    def answer(self, req, on_text=None):
        self.calls.append(req)
        named = Counter(w for s in req.shots for w in s.chosen.split() if w in COLOURS)
        colour = self.fixed or (named.most_common(1)[0][0] if named else "grey")
        text = f"Get the {colour} one." if self.text is None else self.text
        if on_text is not None:
            on_text(text)
        return Answer(text, None, 10, 4, 0, "stop")

    def forget(self, user_id):
        pass


def toy_prefer(user, question, a, b):
    r = toy_reward_for(user)
    ra, rb = r(question, a), r(question, b)
    return 1.0 if ra > rb else 0.0 if ra < rb else 0.5


def _colour_app(tmp_path, study_file, fixed="red"):
    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    fspo, base = ColourBackend(), ColourBackend(fixed=fixed)
    systems = [System("fspo", fspo), System("base", base, shots=0)]
    return create_app(store, systems, study=StudyConfig.load(study_file)), store, fspo, base


def _label(client, key, user):
    """Label the pairs the study shows next as `user` would, "none" where they are indifferent; the
    labels given."""
    labels = []
    state = client.get("/v1/study/state", headers=_auth(key)).json()
    while state["pair"] is not None:
        p = state["pair"]
        s = toy_prefer(user, p["question"], p["a"], p["b"])
        labels.append({"pair_id": p["pair_id"], "choice": "a" if s > 0.5 else "b" if s < 0.5 else "none"})
        r = client.post("/v1/study/labels", json=labels[-1], headers=_auth(key))
        assert r.status_code == 200, r.text
        state = r.json()
    return labels


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_study_routes_end_to_end(tmp_path, study_file):
    from fastapi.testclient import TestClient

    app, store, fspo, base = _colour_app(tmp_path, study_file)
    user = toy_users(4)[1]  # likes blue
    with TestClient(app, base_url="http://localhost") as client:
        r = client.post("/v1/study/join", json={"code": "wrong"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "code"
        r = client.post("/v1/study/join", json={"code": "letmein", "name": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"
        joined = client.post("/v1/study/join", json={"code": "letmein"}).json()
        key, me = joined["api_key"], joined["participant"]
        assert client.get("/v1/study/pairs").status_code == 401
        r = client.get("/v1/study/next", headers=_auth(key))
        assert r.status_code == 409 and "label" in r.json()["error"]["message"]

        pairs = client.get("/v1/study/pairs", headers=_auth(key)).json()
        assert pairs == client.get("/v1/study/pairs", headers=_auth(key)).json()
        assert len(pairs) == 8 and all(set(p) == {"pair_id", "question", "a", "b"} for p in pairs)
        # Only the pair shown next is taken, once.
        r = client.post(
            "/v1/study/labels", json={"pair_id": pairs[1]["pair_id"], "choice": "a"}, headers=_auth(key)
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_next_pair"
        labels = _label(client, key, user)
        assert [lab["pair_id"] for lab in labels] == [p["pair_id"] for p in pairs[: len(labels)]]
        r = client.post("/v1/study/labels", json=labels[0], headers=_auth(key))
        assert r.status_code == 409

        trial = client.get("/v1/study/next", headers=_auth(key)).json()
        assert set(trial) == {"trial_id", "question", "left", "right", "done", "index", "total"}
        assert (trial["done"], trial["index"], trial["total"]) == (False, 1, 3)
        assert client.get("/v1/study/next", headers=_auth(key)).json() == trial  # unvoted: shown again
        # FSPO answered from this participant's labels (oldest first), the zero-shot baseline from none.
        assert [list(r.shots) for r in fspo.calls] == [[p.record() for p in store.shots(me)]]
        assert sum(lab["choice"] != "none" for lab in labels) == len(store.shots(me)) == 4
        assert [len(r.shots) for r in base.calls] == [0]
        assert fspo.calls[0].cache_owner == me and fspo.calls[0].max_new_tokens == 16
        (stored,) = store.trials(me)
        assert {stored.left_system, stored.right_system} == {"fspo", "base"}
        fspo_side, base_side = ("left", "right") if stored.left_system == "fspo" else ("right", "left")
        assert trial[fspo_side] == ColourBackend().answer(fspo.calls[0]).text
        assert trial[base_side] == "Get the red one."
        assert "fspo" not in json.dumps(trial) and "base" not in json.dumps(trial)

        vote = f"/v1/study/trials/{trial['trial_id']}/vote"
        r = client.post(vote, json={"choice": "center"}, headers=_auth(key))
        assert r.status_code == 400 and r.json()["error"]["param"] == "choice"
        assert client.post(vote, json={"choice": "left"}, headers=_auth(key)).json() == {
            "trial_id": trial["trial_id"],
            "vote": "left",
        }
        r = client.post(vote, json={"choice": "right"}, headers=_auth(key))
        assert r.status_code == 409
        assert [t.vote for t in store.trials(me)] == ["left"]

        other = client.post("/v1/study/join", json={"code": "letmein"}).json()
        assert other["participant"] != me
        r = client.post(vote, json={"choice": "tie"}, headers=_auth(other["api_key"]))
        assert r.status_code == 404  # another's trial is as absent as a trial that never was
        assert (
            client.post("/v1/study/trials/999/vote", json={"choice": "tie"}, headers=_auth(key)).status_code
            == 404
        )
        store.ensure_user("admin")
        admin = store.create_key("admin", "admin")[1]
        assert client.get("/v1/study/pairs", headers=_auth(admin)).status_code == 403
        # A user key of someone who did not join: refused on every study route.
        outsider = store.create_key("outsider")[1]
        for method, path in [
            ("GET", "/v1/study/pairs"),
            ("GET", "/v1/study/state"),
            ("POST", "/v1/study/labels"),
            ("GET", "/v1/study/next"),
            ("POST", vote),
        ]:
            r = client.request(method, path, json={"choice": "left"}, headers=_auth(outsider))
            assert r.status_code == 403 and r.json()["error"]["code"] == "not_a_participant", path
        assert store.trials("outsider") == []

        seen = [trial["question"]]
        for i in (2, 3):
            t = client.get("/v1/study/next", headers=_auth(key)).json()
            assert t["index"] == i
            seen.append(t["question"])
            assert client.post(
                f"/v1/study/trials/{t['trial_id']}/vote", json={"choice": "tie"}, headers=_auth(key)
            )
        assert client.get("/v1/study/next", headers=_auth(key)).json() == {"done": True, "total": 3}
        assert len(set(seen)) == 3 and set(seen) <= set(QUESTIONS)
        assert sorted(seen) == sorted(app.state.study.questions_for(me))
    assert [t.vote for t in store.trials(me)] == ["left", "tie", "tie"]
    assert store.trials(other["participant"]) == []


def test_participants_come_back_and_cannot_unblind_the_study(tmp_path, study_file):
    from fastapi.testclient import TestClient

    invites = study_file.parent / "invites.txt"
    assert study_cli("invites", "--out", invites, "--count", "3")[0] == 0
    written = invites.read_text().split()
    assert len(set(written)) == 3 and all(re.fullmatch(r"([A-Z2-9]{4}-){3}[A-Z2-9]{4}", c) for c in written)
    assert study_cli("invites", "--out", invites, "--count", "3") == (
        2,
        f"--out {invites}: exists; invites are never overwritten (codes may be handed out)",
    )
    invites.write_text("# one a person\nAAAA-BBBB\nCCCC-DDDD\nEEEE-FFFF\n")
    with study_file.open("a") as f:
        f.write("invites: invites.txt\nmax_participants: 2\n")
    app, store, *_ = _colour_app(tmp_path, study_file)
    app.state.study_throttle = Throttle(max_failures=4, window_s=60)
    with TestClient(app, base_url="http://localhost") as client:
        r = client.post("/v1/study/join", json={"code": "letmein"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "invite"
        joined = client.post("/v1/study/join", json={"code": "letmein", "invite": "aaaa bbbb"}).json()
        key, me, code = joined["api_key"], joined["participant"], joined["resume_code"]
        # The invite is one person's: used again, it sends them to their resume code.
        r = client.post("/v1/study/join", json={"code": "letmein", "invite": "AAAA-BBBB"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "invite_used"
        # Blind: the participant's key reaches the study only, so no system can be listed or named.
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/v1/models/fspo"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/users/me/preferences"),
            ("POST", "/v1/users/me/preferences"),
            ("GET", "/v1/users/me/description"),
        ]:
            r = client.request(
                method, path, json={"prompt": QUESTIONS[0], "model": "fspo"}, headers=_auth(key)
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "study_key", path
        _label(client, key, toy_users(4)[1])
        first = client.get("/v1/study/next", headers=_auth(key)).json()
        client.post(f"/v1/study/trials/{first['trial_id']}/vote", json={"choice": "left"}, headers=_auth(key))
        # Back with the resume code (as typed by hand): the same participant, at their second question.
        back = client.post("/v1/study/resume", json={"resume_code": code.lower().replace("-", " ")}).json()
        assert back["participant"] == me and back["api_key"] != key and back.get("resume_code") is None
        state = client.get("/v1/study/state", headers=_auth(back["api_key"])).json()
        assert state["pair"] is None and state["trials_voted"] == 1
        assert client.get("/v1/study/next", headers=_auth(back["api_key"])).json()["index"] == 2
        # Seats: the second invite joins, the third finds the study full.
        assert (
            client.post("/v1/study/join", json={"code": "letmein", "invite": "CCCC-DDDD"}).status_code == 200
        )
        r = client.post("/v1/study/join", json={"code": "letmein", "invite": "EEEE-FFFF"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "study_full"
        # Wrong codes from one client are slowed down: after four (the first join above was one), even a
        # right code waits.
        for wrong in ({"code": "nope"}, {"code": "letmein", "invite": "ZZZZ"}):
            assert client.post("/v1/study/join", json=wrong).status_code == 403
        assert client.post("/v1/study/resume", json={"resume_code": "QQQQ"}).status_code == 403
        r = client.post("/v1/study/resume", json={"resume_code": code})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_attempts"
        assert int(r.headers["retry-after"]) >= 1
    report = summarize_trials(store.trials(), "fspo", "base")
    assert (report.participants, report.trials) == (1, 1)


def test_throttle_forgets_failures_after_its_window():
    now = [0.0]
    throttle = Throttle(max_failures=2, window_s=10, max_clients=2, clock=lambda: now[0])
    throttle.failed("a")
    throttle.failed("a")
    with pytest.raises(APIError) as refused:
        throttle.check("a")
    assert refused.value.status_code == 429 and refused.value.headers["Retry-After"] == "10"
    throttle.check("b")
    now[0] = 10.5
    throttle.check("a")  # both failures left the window
    for client in ("b", "c", "d"):
        throttle.failed(client)
    assert len(throttle._failures) == 2  # bounded: the stalest client went first


def test_join_without_a_study_is_404(tmp_path):
    from fastapi.testclient import TestClient

    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    app = create_app(store, [System("fspo", ColourBackend())])
    with TestClient(app, base_url="http://localhost") as client:
        r = client.post("/v1/study/join", json={"code": "x"})
    assert r.status_code == 404 and "no study" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------------------- simulate
def test_simulate_over_http_votes_as_each_user_would(tmp_path, study_file):
    from fspo.serve.study_cli import simulate
    from fspo.serve.study_report import report
    from fspo.testing import serve_in_thread

    app, store, _, _ = _colour_app(tmp_path, study_file, fixed="red")
    users = toy_users(8)
    with serve_in_thread(app) as url:
        done = simulate(url, "letmein", users, prefer=toy_prefer, workers=2)
    assert [p.user_id for p in done] == [u.user_id for u in users]
    by_participant = {p.participant: next(u for u in users if u.user_id == p.user_id) for p in done}
    trials = store.trials()
    assert trials and all(t.vote is not None for t in trials)
    for p in done:  # "no preference" on the pairs the user is indifferent to, until 4 labels or no spares
        assert p.labels == 4 or p.labels + p.ties_skipped == 8
        mine = [t for t in trials if t.participant == p.participant]
        assert len(mine) == 3 == sum(p.votes.values())
    # Every vote is the user's exact preference between the two sides shown.
    expected = []
    for t in trials:
        user = by_participant[t.participant]
        s = toy_prefer(user, t.question, t.left_answer, t.right_answer)
        assert t.vote == ("left" if s > 0.5 else "right" if s < 0.5 else "tie")
        fspo_answer = t.left_answer if t.left_system == "fspo" else t.right_answer
        base_answer = t.right_answer if t.left_system == "fspo" else t.left_answer
        expected.append(toy_prefer(user, t.question, fspo_answer, base_answer))
    rep = report(store, "fspo", "base", resamples=1000)
    assert rep.win_rate == pytest.approx(sum(expected) / len(expected))
    # FSPO names each user's colour from their labels; the baseline always says red: red users tie.
    reds = {p.participant for p in done if by_participant[p.participant].metadata["fav"] == "red"}
    assert rep.ties == sum(t.participant in reds for t in trials) and rep.baseline_wins == 0


def test_simulate_refuses_users_without_an_exact_reward(tmp_path, study_file):
    from fspo.serve.study_cli import simulate

    with pytest.raises(UserError, match="not a simulated user"):
        simulate("http://127.0.0.1:9", "letmein", toy_users(2))  # the default judge: fspo.sim's reward


def test_simulate_reports_the_servers_refusal(tmp_path, study_file):
    from fspo.serve.study_cli import simulate
    from fspo.testing import serve_in_thread

    app, *_ = _colour_app(tmp_path, study_file)
    with (
        serve_in_thread(app) as url,
        pytest.raises(UserError, match="join: the server answered 403: wrong study code"),
    ):
        simulate(url, "wrong", toy_users(1), prefer=toy_prefer)


# ------------------------------------------------------------------- the commands, on simulated users
def study_cli(*args):
    """`fspo study ...` through conftest's `run_typer`."""
    from fspo.cli import app

    return run_typer(app, "study", *args)


@pytest.fixture(scope="module")
def mini_quickstart(tmp_path_factory):
    """The folders of a quickstart that `fspo study init` reads: sim/ (roleplay users) and episodes/."""
    from fspo.data.episodes import build_episodes, write_episodes
    from fspo.sim import simulate as simulate_users
    from fspo.sim import write_sim

    root = tmp_path_factory.mktemp("quickstart")
    data = simulate_users(
        "roleplay",
        n_users=15,
        prefs_per_user=8,
        seed=0,
        pairing="minimal",
        traits=["format", "enthusiasm"],
        min_traits=1,
        max_traits=1,
        holdout="users",
    )
    write_sim(root / "sim", data)
    write_episodes(
        root / "episodes", build_episodes(data.preferences, data.users, shots=2, seed=0), {"shots": 2}
    )
    return root


def test_init_simulate_report_on_the_quickstarts_unseen_users(tmp_path, mini_quickstart, tiny_llama_folder):
    from fspo.data.episodes import load_episodes
    from fspo.data.io import read_records
    from fspo.data.schema import Preference, User
    from fspo.serve.answerers import local_answerer
    from fspo.testing import serve_in_thread

    out = tmp_path / "study"
    code, text = study_cli("init", "--from-quickstart", mini_quickstart, "--out", out, "--code", "abc")
    assert code == 0, text
    assert "fspo serve --model" in text and "population-ipo=" in text and "fspo study simulate" in text
    unseen = load_episodes(mini_quickstart / "episodes", "test_unseen")
    users = read_records(out / "users.jsonl", User)
    assert {u.user_id for u in users} == {e.user_id for e in unseen}
    bank = read_records(out / "pairs.jsonl", Preference)
    assert {(p.question, p.chosen) for p in bank} == {(s.question, s.chosen) for e in unseen for s in e.shots}
    study = StudyConfig.load(out / "study.yaml")
    assert study.code == "abc" and (study.fspo, study.baseline) == ("fspo", "population-ipo")
    assert set(study.question_bank) == {e.query.question for e in unseen}
    assert study.trials_per_participant == round(len(unseen) / len(users))
    assert 2 <= study.label_count <= len(bank)  # enough pairs for two decided labels, on average

    db = tmp_path / "serve.db"
    store = Store(f"sqlite:///{db}")
    model = local_answerer(tiny_llama_folder, cache_bytes=0)
    # As the serve command `init` prints: FSPO with at most the episodes' number of shots.
    assert "--shots 2 " in text
    systems = [System("fspo", model, shots=2), System("population-ipo", model, shots=0)]
    app = create_app(store, systems, study=study)
    with serve_in_thread(app) as url:
        code, text = study_cli(
            "simulate", "--url", url, "--study", out / "study.yaml", "--users", out / "users.jsonl",
            "--db", f"sqlite:///{db}", "--out", tmp_path / "sim.json",
        )  # fmt: skip
    assert code == 0, text
    sim = json.loads((tmp_path / "sim.json").read_text())
    voters = [p for p in sim["participants"] if p["labels"]]
    assert sim["report"]["trials"] == sum(sum(p["votes"].values()) for p in voters) > 0
    assert {p["user_id"] for p in sim["participants"]} == {u.user_id for u in users}

    code, text = study_cli("report", "--db", f"sqlite:///{db}", "--out", tmp_path / "report.json")
    assert code == 0, text
    rep = json.loads((tmp_path / "report.json").read_text())
    assert (rep["fspo"], rep["baseline"]) == ("fspo", "population-ipo")  # the one other system of the trials
    assert rep["win_rate"] == sim["report"]["win_rate"] and "win rate over population-ipo" in text
    assert sum(q["n"] for q in rep["per_question"]) == rep["trials"]


def test_report_command_errors(tmp_path):
    assert study_cli("report", "--db", f"sqlite:///{tmp_path / 'none.db'}") == (
        2,
        f"--db: no database file {str(tmp_path / 'none.db')!r}",
    )
    Store(f"sqlite:///{tmp_path / 'empty.db'}").close()
    code, text = study_cli("report", "--db", f"sqlite:///{tmp_path / 'empty.db'}", "--baseline", "b")
    assert code == 2 and "no study trials of 'fspo' vs 'b'" in text
    code, text = study_cli("report", "--db", f"sqlite:///{tmp_path / 'empty.db'}")
    assert code == 2 and "--baseline: name the system" in text
    code, text = study_cli("init", "--from-quickstart", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "sim" in text


def test_the_report_file_never_holds_the_database_password(tmp_path, monkeypatch):
    from fspo.serve import study_cli as commands

    trials = [_won("p0", "q0", "win", True), _won("p1", "q0", "loss", False)]
    opened: list[str] = []

    def from_trials(db, fspo, baseline, **kwargs):
        opened.append(db)
        return summarize_trials(trials, fspo, baseline or "base", resamples=100)

    monkeypatch.setattr(commands, "study_report", from_trials)
    db = "postgresql://ann:hunter2@db.example/fspo"
    code, text = study_cli("report", "--db", db, "--out", tmp_path / "report.json")
    assert code == 0 and opened == [db]  # the real URL opens the database ...
    written = (tmp_path / "report.json").read_text()
    assert json.loads(written)["db"] == "postgresql://ann:***@db.example/fspo"  # ... the file never has it
    assert "hunter2" not in written and "hunter2" not in text


def test_an_empty_answer_is_stored_and_shown_as_said(tmp_path, study_file):
    """A system that answers nothing gets an empty side: no placeholder text in the data, since the
    offline evaluation judges the empty answer too, and a vote for it is a vote for saying nothing."""
    from fastapi.testclient import TestClient

    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    systems = [System("fspo", ColourBackend()), System("base", ColourBackend(text=""), shots=0)]
    app = create_app(store, systems, study=StudyConfig.load(study_file))
    with TestClient(app, base_url="http://localhost") as client:
        key = client.post("/v1/study/join", json={"code": "letmein"}).json()["api_key"]
        _label(client, key, toy_users(4)[0])
        trial = client.get("/v1/study/next", headers=_auth(key)).json()
        voted = client.post(
            f"/v1/study/trials/{trial['trial_id']}/vote", json={"choice": "left"}, headers=_auth(key)
        )
    assert voted.status_code == 200
    stored = store.trials()[0]
    base_side, fspo_side = ("left", "right") if stored.left_system == "base" else ("right", "left")
    assert trial[base_side] == "" == getattr(stored, f"{base_side}_answer")
    assert trial[fspo_side].startswith("Get")


def test_simulated_votes_tie_exactly_where_the_offline_judge_ties(monkeypatch):
    """`fspo study simulate` votes with `fspo.sim.reward.prefer`, `fspo eval winrate` judges with
    `ExactRewardJudge`: one tie rule, so float noise in a reward is a tie for both."""
    from fspo.eval.judges import ExactRewardJudge
    from fspo.sim import reward as sim_reward

    rewards = {"a": 0.1 + 0.2, "b": 0.3, "c": 0.3 + 2e-9}  # a and b differ in the last bits only

    def reward_for(user):
        return lambda question, text: rewards[text]

    monkeypatch.setattr(sim_reward, "reward_for", reward_for)
    judge = ExactRewardJudge(reward_for=reward_for)
    user = toy_users(1)[0]
    for a, b, expected in [("a", "b", 0.5), ("b", "a", 0.5), ("c", "a", 1.0), ("a", "c", 0.0)]:
        assert sim_reward.prefer(user, "q", a, b) == judge.prefer(user, "q", a, b) == expected, (a, b)


def test_init_from_synth_holds_questions_out_of_the_bank_for_the_trials(tmp_path):
    """A synth export (users.jsonl, preferences.jsonl) becomes a study for people: the bank is its answer
    pairs, once each, and the trials' questions are never among the bank's."""
    synth = tmp_path / "synth"
    synth.mkdir()
    users = toy_users(4)
    prefs = toy_preferences(users, per_user=10)
    write_jsonl(synth / "users.jsonl", users)
    write_jsonl(synth / "preferences.jsonl", prefs)
    out = tmp_path / "study"
    args = ["init", "--from-synth", synth, "--out", out, "--label-count", "4", "--trials", "2"]
    code, text = study_cli(
        *args, "--fspo-model", "runs/smollm2/fspo", "--baseline-model", "base=runs/smollm2:0"
    )
    assert code == 0, text
    assert "fspo serve --model runs/smollm2/fspo --shots 8 --baseline base=runs/smollm2:0 --study" in text
    study = StudyConfig.load(out / "study.yaml")
    assert (study.fspo, study.baseline, study.label_count, study.trials_per_participant) == (
        "fspo",
        "base",
        4,
        2,
    )
    held = set(study.question_bank)
    assert held and not held & {p.question for p in study.bank}
    assert held | {p.question for p in study.bank} == {p.question for p in prefs}
    assert len({(p.question, frozenset((p.chosen, p.rejected))) for p in study.bank}) == len(study.bank)
    assert study_cli(*args) == (
        2,
        "study init --from-synth: name the models to serve with --fspo-model and --baseline-model",
    )
    assert study_cli("init", "--out", out)[0] == 2  # neither source
