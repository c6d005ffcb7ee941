"""The page for people, driven in a real browser against the real app.

Debian's chromium through Playwright (`executable_path`, headless; Playwright's own browser download
is never used). The app is the one `fspo serve` runs: `create_app` over a `Store` on a temporary SQLite
file, a tiny Llama served as both the FSPO system and a zero-shot baseline, and a study over a small
toy bank. A person signs in with the study code, labels every pair (always the answer naming blue),
asks a question, deletes a preference, and votes on every trial; the database must then hold exactly
what the clicks said, one vote per trial, and the browser must have logged no error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import write_jsonl
from fspo.data.schema import Preference
from fspo.testing import toy_episodes, toy_preferences, toy_users

CHROMIUM = Path("/usr/bin/chromium")
CODE = "blue-sky-42"
WAIT = 30_000  # ms: answers are generated on the CPU while the page waits

# A pair whose text looks like markup: the page must show it as text and never run it.
MARKUP_QUESTION = 'Which <b>hat</b> & <img src=x onerror="window.__pwned=1">?'
QUESTIONS = ["Which coat should I get?", "Which lamp should I get?", "Which door should I paint?"]


def _install_chromium() -> str:
    """Try to install Debian's chromium (as `.ci/run` does); the reason it is still missing, if it is."""
    if os.geteuid() != 0:
        return f"{CHROMIUM} is missing and this user is not root, so it cannot be installed"
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "fonts-dejavu-core"]
    for cmd in (["apt-get", "update", "-qq"], install):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"{CHROMIUM} is missing and `{' '.join(cmd)}` timed out"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            return f"{CHROMIUM} is missing and `{' '.join(cmd)}` failed: {last}"
    return f"{CHROMIUM} is still missing after installing Debian's chromium package"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        reason = _install_chromium()
        if not CHROMIUM.exists():
            print(f"SKIP test_serve_browser: {reason}")
            pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def bank() -> list[Preference]:
    """Three toy pairs of a blue-loving user, and one whose question looks like HTML."""
    blue = toy_users(2)[1]
    assert blue.metadata["fav"] == "blue"
    pairs = toy_preferences([blue], per_user=3)
    return [
        *pairs,
        Preference(
            user_id="bank",
            question=MARKUP_QUESTION,
            chosen="Get the blue hat.",
            rejected="Get the <i>red</i> hat.",
        ),
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_folder: Path) -> Path:
    """The tiny Llama, pretrained for a few seconds on rendered toy episodes.

    Untrained, it answers only newlines, which the engine strips: the page would show nothing, and the
    test could not tell a working stream from a broken one. After this it answers in sentences such
    as "Get the red wall.", some over several lines.
    """
    from fspo.data.template import render
    from fspo.models.pretrain import pretrain

    folder = tmp_path_factory.mktemp("serve_page_model") / "model"
    shutil.copytree(tiny_llama_folder, folder)
    docs = [render(e).prompt + render(e).chosen for e in toy_episodes(toy_users(4), per_user=4, shots=3)]
    pretrain(folder, docs * 4, steps=80, lr=1e-2, batch_size=8, block_size=256)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, bank: list[Preference]):
    """(base URL, store, study) of the app serving the page, on 127.0.0.1."""
    from fspo.serve.answerers import System, local_answerer
    from fspo.serve.app import create_app
    from fspo.serve.store import Store
    from fspo.serve.study import StudyConfig
    from fspo.testing import serve_in_thread

    root = tmp_path_factory.mktemp("serve_page")
    (root / "questions.txt").write_text("\n".join(QUESTIONS) + "\n")
    study = StudyConfig(
        code=CODE,
        pairs=write_jsonl(root / "pairs.jsonl", bank),
        label_count=len(bank) - 1,  # one spare pair, for a "no preference"
        questions=root / "questions.txt",
        trials_per_participant=2,
        fspo="fspo",
        baseline="zero-shot",
        max_new_tokens=16,
    )
    backend = local_answerer(model_dir)
    systems = [System(name="fspo", answerer=backend), System(name="zero-shot", answerer=backend, shots=0)]
    store = Store(f"sqlite:///{root / 'serve.db'}")
    app = create_app(store, systems, default_system="fspo", study=study)
    try:
        with serve_in_thread(app) as url:
            yield url, store, study
    finally:
        store.close()


def _watch(page) -> dict[str, list]:
    """Everything the browser reports going wrong on `page`."""
    seen: dict[str, list] = {"console": [], "pageerror": [], "http": [], "votes": []}
    page.on("console", lambda m: seen["console"].append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: seen["pageerror"].append(str(e)))
    page.on("response", lambda r: seen["http"].append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("request", lambda r: seen["votes"].append(r.url) if r.url.endswith("/vote") else None)
    return seen


def _no_overflow(page) -> None:
    """Nothing wider than the window: the page reads without sideways scrolling."""
    width, inner = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= inner, f"the page is {width}px wide in a {inner}px window"


def _vote(page, trial_id: int, choice: str):
    """Two clicks in one task, as a double click: the first disables every vote button at once."""
    vote_url = f"/trials/{trial_id}/vote"
    with page.expect_response(lambda r: r.url.endswith(vote_url)) as voted:
        disabled = page.evaluate(
            """(choice) => {
                const button = document.querySelector(`#trial .vote[data-choice=${choice}]`);
                button.click();
                button.click();
                return [...document.querySelectorAll('#trial .vote')].map((b) => b.disabled);
            }""",
            choice,
        )
    assert disabled == [True, True, True]
    assert voted.value.status == 200


def _shown_trial(page, n: int, total: int) -> tuple[int, str, str]:
    from playwright.sync_api import expect

    trial = page.locator("#trial")
    expect(trial).to_be_visible(timeout=WAIT)
    expect(page.locator("#trial-progress")).to_have_text(f"Question {n} of {total}.", timeout=WAIT)
    expect(trial.get_by_role("button", name="Left is better")).to_be_enabled()
    return (
        int(trial.get_attribute("data-trial-id")),
        page.locator("#trial-left").text_content(),
        page.locator("#trial-right").text_content(),
    )


def test_participant_labels_votes_leaves_and_comes_back(browser, served, bank, tmp_path: Path) -> None:
    import httpx
    from playwright.sync_api import expect

    from fspo.serve.study_report import summarize_trials

    url, store, study = served
    page = browser.new_page(viewport={"width": 1100, "height": 850})
    seen = _watch(page)
    page.goto(url)

    # Join: the resume code is shown once, before anything else.
    page.get_by_label("Study code").fill(CODE)
    page.get_by_role("button", name="Join the study").click()
    expect(page.locator("#joined-code")).to_have_text(re.compile(r"^(\w{4}-){3}\w{4}$"), timeout=WAIT)
    resume_code = page.locator("#joined-code").text_content()
    key = page.evaluate("() => sessionStorage.getItem('fspo.apiKey')")
    principal = store.authenticate(key)
    assert principal is not None and principal.scope == "study"
    participant = principal.user_id
    # Blind by construction: the participant's key can neither list the systems nor ask one by name.
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/fspo", None),
        ("POST", "/v1/completions", {"prompt": QUESTIONS[0], "model": "fspo"}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTIONS[0]}]}),
    ]:
        r = httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "study_key", (path, r.text)
    page.get_by_role("button", name="I have written it down: start").click()
    expect(page.locator("#tab-ask")).to_be_hidden()

    # Label: "no preference" on the first pair brings on a spare; the answer naming blue is preferred.
    expect(page.locator("#label-progress")).to_have_text(
        f"Labeled 0 of {study.label_count} pairs.", timeout=WAIT
    )
    skipped_question = page.locator("#label-question").text_content()
    skipped = page.locator("#label-a").text_content(), page.locator("#label-b").text_content()
    page.get_by_role("button", name="No preference").click()
    expect(page.locator("#label-progress")).to_contain_text("1 answered “no preference”")
    expected = {}
    for i in range(study.label_count):
        expect(page.locator("#label-progress")).to_contain_text(f"Labeled {i} of {study.label_count} pairs.")
        question = page.locator("#label-question").text_content()
        answers = {side: page.locator(f"#label-{side}").text_content() for side in "ab"}
        side = "a" if "blue" in answers["a"] else "b"
        expected[question] = (answers[side], answers["b" if side == "a" else "a"])
        page.locator(f"#label-{side}").click()
        expect(page.locator("#label-progress")).not_to_contain_text(f"Labeled {i} of")
    expect(page.locator("#label-done")).to_be_visible()
    assert set(skipped) not in [set(answers) for answers in expected.values()]
    assert len(expected) == study.label_count
    shown_questions = {*expected, skipped_question}
    assert MARKUP_QUESTION in shown_questions, "the markup-looking question is shown as its own text"
    assert page.evaluate("() => window.__pwned") is None and page.locator("#view-label img").count() == 0
    stored = store.preferences(participant)
    assert {p.question: (p.chosen, p.rejected) for p in stored} == expected

    # The first trial, then leave: signing out says how to come back.
    page.get_by_role("button", name="2. Compare").click()
    shown_trials = [_shown_trial(page, 1, 2)]
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("FSPO_SCREENSHOT"):
        Path(os.environ["FSPO_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=os.environ["FSPO_SCREENSHOT"], full_page=True)
    page.set_viewport_size({"width": 360, "height": 740})  # a phone
    _no_overflow(page)
    page.set_viewport_size({"width": 1100, "height": 850})
    _vote(page, shown_trials[0][0], "left")
    expect(page.locator("#trial")).not_to_have_attribute(
        "data-trial-id", str(shown_trials[0][0]), timeout=WAIT
    )
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#status")).to_contain_text(resume_code)
    assert page.evaluate("() => sessionStorage.getItem('fspo.apiKey')") is None

    # Come back in a new tab with the resume code (typed in lower case, with spaces): the same person,
    # on their second question.
    page.close()
    page = browser.new_page(viewport={"width": 1100, "height": 850})
    seen = {k: v + _watch(page)[k] for k, v in seen.items()}
    page.goto(url)
    page.get_by_role("textbox", name="Resume code").fill(resume_code.lower().replace("-", " "))
    page.get_by_role("button", name="Continue where I stopped").click()
    shown_trials.append(_shown_trial(page, 2, 2))
    again = store.authenticate(page.evaluate("() => sessionStorage.getItem('fspo.apiKey')"))
    assert again is not None and again.user_id == participant
    _vote(page, shown_trials[1][0], "right")
    expect(page.locator("#study-done")).to_be_visible(timeout=WAIT)

    trials = store.trials(participant)
    assert sorted((t.id, t.left_answer, t.right_answer) for t in trials) == sorted(shown_trials)
    assert [t.vote for t in sorted(trials, key=lambda t: t.id)] == ["left", "right"]
    assert {t.question for t in trials} <= set(QUESTIONS)
    # The report counts the person once, with both votes.
    report = summarize_trials(store.trials(), "fspo", "zero-shot")
    assert (report.participants, report.trials) == (1, 2)

    # A reload keeps the session (the key is in sessionStorage) and the finished study.
    page.reload()
    expect(page.locator("#study-done")).to_be_visible(timeout=WAIT)
    problems = {k: seen[k] for k in ("pageerror", "console") if seen[k]}
    assert not problems, json.dumps(problems, indent=1)
    page.close()


def test_user_with_a_key_asks_and_manages_preferences(browser, served, bank) -> None:
    import httpx
    from playwright.sync_api import expect

    url, store, _ = served
    _, key = store.create_key("page-user")
    store.add_preferences("page-user", [p.model_copy(update={"user_id": "page-user"}) for p in bank])
    page = browser.new_page(viewport={"width": 1100, "height": 850})
    seen = _watch(page)
    page.goto(url)
    page.get_by_text("I have an API key").click()
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#label-done-text")).to_have_text("This server has no pairs to label: ask away.")

    # Your preferences, listed as text; delete the markup-looking one (the tiny model, which never saw
    # such text, stops at once when it is a shot).
    page.get_by_role("button", name="Ask a question").click()
    expect(page.locator("#prefs-list li")).to_have_count(len(bank))
    markup = page.locator("#prefs-list li").filter(has_text=MARKUP_QUESTION)
    expect(markup.locator(".pref-question")).to_have_text(MARKUP_QUESTION)
    markup.get_by_role("button", name="Delete").click()
    expect(page.locator("#prefs-list li")).to_have_count(len(bank) - 1)
    assert store.count_preferences("page-user") == len(bank) - 1
    assert page.evaluate("() => window.__pwned") is None and page.locator("#view-ask img").count() == 0

    # Ask: the streamed answer on the page is the API's (greedy) answer with the same shots, in full.
    question = "Which bike should I get?"
    page.get_by_label("Your question").fill(question)
    page.get_by_role("button", name="Ask", exact=True).click()
    expect(page.locator("#status")).to_have_text("Answered.", timeout=WAIT)
    expect(page.locator("#ask-meta")).to_contain_text(
        f"Personalized from {len(bank) - 1} of your preferences"
    )
    shown = page.locator("#ask-answer").text_content()
    assert shown.strip(), "the pretrained model answers in words"
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"messages": [{"role": "user", "content": question}]},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert shown == reply.json()["choices"][0]["message"]["content"]
    problems = {k: seen[k] for k in ("pageerror", "console", "http") if seen[k]}
    assert not problems, json.dumps(problems, indent=1)
    page.close()


def test_api_errors_are_shown_in_the_page(browser, served) -> None:
    from playwright.sync_api import expect

    url, store, _ = served
    page = browser.new_page(viewport={"width": 360, "height": 740})
    seen = _watch(page)
    page.goto(url)
    _no_overflow(page)

    # A wrong code: the API's own message, in the alert region; still on the sign-in form.
    page.get_by_label("Study code").fill("not-the-code")
    page.get_by_role("button", name="Join the study").click()
    expect(page.locator("#error")).to_have_text("wrong study code")
    expect(page.get_by_label("Study code")).to_be_visible()
    assert page.locator("#error").get_attribute("role") == "alert"

    # A revoked key: the API's 401 signs the page out, with a message, instead of a blank page.
    info, key = store.create_key(store.ensure_user("page-revoked").user_id)
    store.revoke_key(info.id)
    page.get_by_text("I have an API key").click()
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).not_to_be_empty()
    expect(page.get_by_label("Study code")).to_be_visible()
    assert page.evaluate("() => sessionStorage.getItem('fspo.apiKey')") is None

    assert seen["pageerror"] == []
    # The browser logs every 4xx response it fetched; those two are the only ones.
    assert sorted(s.split()[0] for s in seen["http"]) == ["401", "403"], seen["http"]
    assert all("status of 40" in m for m in seen["console"]), seen["console"]
    page.close()
