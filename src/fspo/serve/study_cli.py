"""The `fspo study` commands: the study's report and simulated participants (`fspo study init`, a study
from a quickstart's folders, is the quickstart's: `fspo.quickstart.study`).

`simulate` is the end-to-end check of the serving path (issue #20, item 5): simulated users take the
study through the same HTTP API a person's page uses (join with the code, label the pairs shown, ask for
trials, vote), labelling and voting with their exact reward. On the quickstart's models its win rate
must agree, within its interval, with the offline `fspo eval winrate` of FSPO vs population-IPO on
the same unseen users; `fspo study init` writes the study that makes that comparison.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fspo.core.errors import UserError
from fspo.data.schema import User

app = typer.Typer(
    help="The blind study: its report, simulated participants, a study from a quickstart.",
    no_args_is_help=True,
)
console = Console()

Prefer = Callable[[User, str, str, str], float]  # probability that the user prefers a over b (the judge API)


# ------------------------------------------------------------------------------------------- report
def study_report(
    db: str,
    fspo: str = "fspo",
    baseline: str | None = None,
    *,
    resamples: int = 10000,
    seed: int = 0,
):
    """`fspo.serve.study.report` on the database at `db`; `baseline` defaults to the one other system
    the trials hold (a `UserError` naming them when there are several)."""
    from fspo.serve.cli import open_store
    from fspo.serve.study_report import report

    store = open_store(db, create=False)  # a missing file is an error, not a new empty database
    try:
        if baseline is None:
            others = sorted({s for t in store.trials() for s in (t.left_system, t.right_system)} - {fspo})
            if len(others) != 1:
                found = ", ".join(others) or "none"
                raise UserError(
                    f"--baseline: name the system FSPO was compared with (the trials hold: {found})"
                )
            baseline = others[0]
        return report(store, fspo, baseline, resamples=resamples, seed=seed)
    finally:
        store.close()


def print_report(rep: Any) -> None:
    table = Table(title=f"Blind study: {rep.fspo} vs {rep.baseline} ({rep.participants} participants)")
    table.add_column("question")
    for name in ("n", f"{rep.fspo} wins", "ties", f"{rep.baseline} wins", "win rate"):
        table.add_column(name, justify="right")
    for q in rep.per_question:
        short = q.question if len(q.question) <= 60 else q.question[:57] + "..."
        table.add_row(
            short, str(q.n), str(q.fspo_wins), str(q.ties), str(q.baseline_wins), f"{q.win_rate:.0%}"
        )
    table.add_section()
    table.add_row(
        "all",
        str(rep.trials),
        str(rep.fspo_wins),
        str(rep.ties),
        str(rep.baseline_wins),
        f"{rep.win_rate:.1%}",
    )
    console.print(table)
    ci = "no interval (one participant)" if rep.ci_low is None else f"[{rep.ci_low:.1%}, {rep.ci_high:.1%}]"
    console.print(
        f"{rep.fspo} win rate over {rep.baseline} (ties half): [bold]{rep.win_rate:.1%}[/] "
        f"{rep.confidence:.0%} CI {ci} ({rep.interval}, {rep.resamples} resamples), n={rep.trials} votes"
        + (f", {rep.unvoted} trials without a vote" if rep.unvoted else "")
    )
    share = "-" if rep.left_share is None else f"{rep.left_share:.1%}"
    console.print(
        f"left-side share (position bias check, ties excluded): {share} "
        f"of {rep.left_votes + rep.right_votes} decisive votes"
    )


@app.command("report")
def report_cmd(
    db: str = typer.Option(..., help="The serve database (SQLAlchemy URL, e.g. sqlite:///fspo-serve.db)."),
    out: Path | None = typer.Option(None, help="Write the report as JSON here."),
    study: Path | None = typer.Option(None, help="The study file: its fspo and baseline system names."),
    fspo: str | None = typer.Option(None, help="FSPO's system name (default: the study's, else 'fspo')."),
    baseline: str | None = typer.Option(
        None, help="The baseline's name (default: the study's, else the other)."
    ),
    resamples: int = typer.Option(10000, min=100, help="Bootstrap resamples (of participants)."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
) -> None:
    """FSPO's win rate (ties half) with a participant bootstrap interval, position bias, per question."""
    from fspo.core.files import atomic_write_json
    from fspo.serve.store import shown_url

    names = _study_names(study) if study else {}
    rep = study_report(
        db,
        fspo or names.get("fspo", "fspo"),
        baseline or names.get("baseline"),
        resamples=resamples,
        seed=seed,
    )
    print_report(rep)
    if out is not None:
        report = {"kind": "fspo.study_report", "db": shown_url(db), **rep.model_dump(mode="json")}
        atomic_write_json(out, report)
        console.print(f"wrote {out}")


def _study_names(file: Path) -> dict[str, str]:
    from fspo.core.files import read_fields

    fields = read_fields(file)
    return {k: str(fields[k]) for k in ("fspo", "baseline") if k in fields}


# ----------------------------------------------------------------------------------------- simulate
@dataclass
class Participation:
    """What one simulated user did in the study."""

    user_id: str
    participant: str
    labels: int = 0
    ties_skipped: int = 0  # pairs the user is indifferent to: labelling them would teach noise
    votes: dict[str, int] = field(default_factory=lambda: {"left": 0, "right": 0, "tie": 0})


def _check(response: Any, what: str) -> Any:
    """The JSON of a successful response; otherwise a `UserError` with the server's message."""
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except Exception:  # noqa: BLE001 - any non-JSON body: show its text
            message = response.text[:300]
        raise UserError(f"{what}: the server answered {response.status_code}: {message}")
    return response.json()


def _choice(p: float, first: str, second: str, tie: str | None) -> str | None:
    return first if p > 0.5 else second if p < 0.5 else tie


def participate(
    client: Any, code: str, user: User, prefer: Prefer, invite: str | None = None
) -> Participation:
    """One simulated user takes the study through the HTTP API, as the page does: the pairs it is
    indifferent to are answered "no preference" (labelling them would teach noise), which brings on
    the study's spare pairs."""
    body = {"code": code} if invite is None else {"code": code, "invite": invite}
    joined = _check(client.post("/v1/study/join", json=body), "join")
    me = Participation(user.user_id, joined["participant"])
    auth = {"Authorization": f"Bearer {joined['api_key']}"}
    state = _check(client.get("/v1/study/state", headers=auth), "GET /v1/study/state")
    while state["pair"] is not None:
        pair = state["pair"]
        choice = _choice(prefer(user, pair["question"], pair["a"], pair["b"]), "a", "b", "none")
        label = {"pair_id": pair["pair_id"], "choice": choice}
        state = _check(client.post("/v1/study/labels", json=label, headers=auth), "POST /v1/study/labels")
    me.labels, me.ties_skipped = state["labeled"], state["skipped"]
    while True:
        trial = _check(client.get("/v1/study/next", headers=auth), "GET /v1/study/next")
        if trial["done"]:
            return me
        choice = _choice(
            prefer(user, trial["question"], trial["left"], trial["right"]), "left", "right", "tie"
        )
        path = f"/v1/study/trials/{trial['trial_id']}/vote"
        _check(client.post(path, json={"choice": choice}, headers=auth), f"POST {path}")
        me.votes[choice] += 1


def simulate(
    url: str,
    code: str,
    users: Sequence[User],
    *,
    prefer: Prefer | None = None,
    workers: int = 1,
    timeout: float = 600.0,
    on_done: Callable[[Participation], None] | None = None,
) -> list[Participation]:
    """Every user in `users` takes the study at `url`, as one participant each, `workers` at a time.

    The server never says which system is on which side, so the mapping participant -> user (returned)
    is kept here. `prefer` is the users' judge, by default `fspo.sim.reward.prefer` (their exact reward).
    """
    import httpx

    if prefer is None:
        from fspo.sim.reward import prefer as sim_prefer

        prefer = sim_prefer
    for user in users:  # fail before any request when a user has no exact reward
        prefer(user, "question", "one answer", "another answer")

    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as client:

        def one(user: User) -> Participation:
            try:
                done = participate(client, code, user, prefer)
            except httpx.HTTPError as err:
                raise UserError(f"study server {url}: {type(err).__name__}: {err}") from None
            if on_done is not None:
                on_done(done)
            return done

        if workers <= 1:
            return [one(u) for u in users]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, users))


def pick_users(users: Sequence[User], participants: int | None, seed: int) -> list[User]:
    """All users in file order, or `participants` of them drawn with `seed`."""
    if participants is None or participants == len(users):
        return list(users)
    if participants > len(users):
        raise UserError(f"--participants {participants}: the users file has only {len(users)} users")
    return random.Random(seed).sample(list(users), participants)


@app.command("invites")
def invites_cmd(
    out: Path = typer.Option(..., help="The invites file to write (name it in the study file's `invites`)."),
    count: int = typer.Option(..., min=1, max=100000, help="How many one-time invite codes."),
) -> None:
    """Write `count` one-time invite codes, one a line: hand each to one person."""
    from fspo.core.files import atomic_write_text
    from fspo.serve.store import new_code

    if out.exists():
        raise UserError(f"--out {out}: exists; invites are never overwritten (codes may be handed out)")
    atomic_write_text(out, "".join(f"{new_code()}\n" for _ in range(count)))
    console.print(f"{count} invite codes written to {out}", highlight=False)


@app.command("simulate")
def simulate_cmd(
    url: str = typer.Option(..., help="The study server, e.g. http://127.0.0.1:8000."),
    study: Path = typer.Option(..., help="The study file (its sign-in code)."),
    users: Path = typer.Option(..., help="Simulated users (users.jsonl): one participant each."),
    participants: int | None = typer.Option(None, min=1, help="Only this many users, drawn with --seed."),
    seed: int = typer.Option(0, help="Seed of the draw of users."),
    workers: int = typer.Option(1, min=1, help="Participants taking the study at once."),
    db: str | None = typer.Option(
        None, help="The server's database: print the study report from it at the end."
    ),
    out: Path | None = typer.Option(
        None, help="Write participants (with their users), votes and report as JSON."
    ),
) -> None:
    """Simulated users take the study through the HTTP API; labels and votes by their exact reward."""
    from rich.progress import Progress

    from fspo.core.files import atomic_write_json, read_fields
    from fspo.data.io import read_records

    fields = read_fields(study)
    code = fields.get("code")
    if not isinstance(code, str) or not code:
        raise UserError(f"{study}: code: the study file needs its sign-in code")
    if fields.get("invites"):
        raise UserError(
            f"{study}: invites: simulated participants join with the code alone; "
            "simulate a study without invites"
        )
    chosen = pick_users(read_records(users, User), participants, seed)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("simulated participants", total=len(chosen))
        done = simulate(url, code, chosen, workers=workers, on_done=lambda _: progress.advance(task))
    votes = {k: sum(p.votes[k] for p in done) for k in ("left", "right", "tie")}
    silent = [p.user_id for p in done if not p.labels]
    console.print(
        f"{len(done)} participants, {sum(p.labels for p in done)} labels "
        f"({sum(p.ties_skipped for p in done)} pairs skipped as ties), {sum(votes.values())} votes: "
        + ", ".join(f"{k} {v}" for k, v in votes.items())
    )
    if silent:
        console.print(
            f"[yellow]{len(silent)} users were indifferent to every pair shown, so had no trials[/]"
        )
    result: dict[str, Any] = {
        "kind": "fspo.study_simulation",
        "url": url,
        "users": str(users),
        "seed": seed,
        "participants": [asdict(p) for p in done],
        "votes": votes,
    }
    if db is not None:
        names = _study_names(study)
        rep = study_report(db, names.get("fspo", "fspo"), names.get("baseline"))
        print_report(rep)
        result["report"] = rep.model_dump(mode="json")
    else:
        console.print(f"the win rate: fspo study report --db <the server's --db> --study {study}")
    if out is not None:
        atomic_write_json(out, result)
        console.print(f"wrote {out}")
