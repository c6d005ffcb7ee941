"""How personal are the answers, how much could the shots tell, and do the answers loop?

`trait_shares`: for each system's generated answers, the share of each user's trait values the answer
carries (`Domain.carried`: bullets when the user wants bullets; a level within half a level), and the
relevance every user rewards alike. A win rate mixes both; this splits them apart. A model that
personalizes carries nearly all of an unseen user's values; one that answers for the population
average carries what the average user's values share with this user's.

`shot_ceiling`: the Bayes ceiling of preference accuracy after n shots, with no model involved. Every
simulated preference is decided by an exact reward, so a learner that knows the population's
personas as its hypotheses can weigh them by how well each explains the shots and vote on the query:

    posterior(u) ∝ prod_{i<=n} (1 - eps if persona u orders shot i as the user did else eps)
    prediction   = posterior-weighted vote of the personas on the query pair

With n = 0 this is the population learner (the best any zero-shot model of these users can do on
average); the rise with n is all the personalization there is to learn. `eps` is the label noise the
learner assumes (it only matters when no persona fits). The hypotheses are every persona of the
population (`hypotheses="population"`): a learner that knows which kinds of user exist, unseen
combinations included, which is what the shots can tell about a new user; `"train"` restricts them to
the training users, which is what a learner that only saw those can infer.

`loop_shares`: for each system, the share of its answers that are repetition loops
(`fspo.infer.loops.repetition_loop`, shared with on-policy training), the way a small model's greedy
decoding degenerates. Any answers, simulated users or not.

`winrate_ceiling`: per opponent, the win rate an ideal answer (`Domain.ideal_reward`: fully relevant,
every one of the user's values carried) gets against its answers by the exact judge. An opponent whose
answers already satisfy a user ties there, so a win rate against it reads as a share of this ceiling.

Why hand-written: these are FSPO's own measurements over `fspo.sim`'s exact rewards.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from fspo.core.errors import UserError
from fspo.data.schema import Episode, User
from fspo.eval.stats import wilson_interval
from fspo.eval.winrates import SPLIT_NAMES
from fspo.infer.loops import LOOP_MIN_WORDS, repetition_loop
from fspo.sim.base import RELEVANCE, SEVERAL, Domain
from fspo.sim.registry import get_domain
from fspo.sim.reward import TIE_MARGIN, prefer_rewards


def _domain_of(users: Mapping[str, User]) -> Domain:
    for user in users.values():
        meta = user.metadata or {}
        if "domain" in meta and "traits" in meta:
            return get_domain(meta["domain"])
    raise UserError("no simulated user (metadata.domain and metadata.traits) among the users")


def _traits_of(domain: Domain, users: Mapping[str, User], rec: Mapping[str, Any]) -> Any:
    """The simulated traits of the user a generation record answers."""
    user = users.get(rec["user_id"])
    if user is None:
        raise UserError(f"generation of {rec['system']}: user {rec['user_id']!r} is not among the users")
    return domain.check_traits((user.metadata or {}).get("traits"))


def trait_shares(
    users: Mapping[str, User], records: Iterable[Mapping[str, Any]]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{system: {split: {"trait_share", "relevance", "n"}}}`` over generation records (the
    `fspo generate` format: user_id, question, answer, system, split)."""
    domain = _domain_of(users)
    relevance = domain.columns.index(RELEVANCE)
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for rec in records:
        traits = _traits_of(domain, users, rec)
        feats = domain.features(rec["question"], [rec["answer"]])[0]
        carried = domain.carried(traits, feats)
        s = sums[(rec["system"], rec.get("split", "all"))]
        s[0] += sum(carried) / len(carried)
        s[1] += float(feats[relevance])
        s[2] += 1
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (system, split), (share, rel, n) in sorted(sums.items()):
        out.setdefault(system, {})[split] = {
            "trait_share": round(share / n, 4),
            "relevance": round(rel / n, 4),
            "n": int(n),
        }
    return out


def loop_shares(
    records: Iterable[Mapping[str, Any]], min_words: int = LOOP_MIN_WORDS
) -> dict[str, dict[str, dict[str, float]]]:
    """``{system: {split: {"loop_share", "loops", "n"}}}``: the share of each system's answers that are
    `repetition_loop`s, over generation records (system, answer, split)."""
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for rec in records:
        c = counts[(rec["system"], rec.get("split", "all"))]
        c[0] += repetition_loop(rec["answer"], min_words)
        c[1] += 1
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (system, split), (loops, n) in sorted(counts.items()):
        out.setdefault(system, {})[split] = {"loop_share": round(loops / n, 4), "loops": loops, "n": n}
    return out


NOT_NAMED = "(not named)"


def description_quality(users: Mapping[str, User], records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """How right RAT's inferred descriptions are, per split, over generation records with a
    ``description`` (`fspo generate --mode rat`), read with `Domain.read_description`:

    * ``named``: the share of the users' true trait values the description names (each trait of
      each user counts once per record; a trait named with several values is not named right);
    * ``per_trait`` accuracy and a ``confusion`` table (true value -> what was named, or
      ``(not named)`` / ``(several)``), and ``extra``: traits named that the user does not have;
    * ``follows``: the share of the values a description names that its own answer carries
      (`Domain.carried`): whether the answer does what the model said the user wants.
    """
    domain = _domain_of(users)
    out: dict[str, Any] = {}
    for rec in records:
        traits = _traits_of(domain, users, rec)
        split = out.setdefault(
            rec.get("split", "all"),
            {
                "records": 0,
                "values": 0,
                "named_right": 0,
                "extra": 0,
                "stated": 0,
                "followed": 0,
                "by_trait": {},
            },
        )
        split["records"] += 1
        named = domain.read_description(rec.get("description") or "")
        for trait, spec in traits.items():
            got = named.get(trait, NOT_NAMED)
            cell = split["by_trait"].setdefault(trait, {})
            row = cell.setdefault(str(spec["value"]), {})
            row[str(got)] = row.get(str(got), 0) + 1
            split["values"] += 1
            split["named_right"] += got == spec["value"]
        split["extra"] += sum(trait not in traits for trait in named)
        stated = {t: {"value": v, "weight": 1.0} for t, v in named.items() if v != SEVERAL}
        if stated:
            feats = domain.features(rec["question"], [rec["answer"]])[0]
            carried = domain.carried(stated, feats)
            split["stated"] += len(carried)
            split["followed"] += sum(carried)
    return {split: _quality_summary(s) for split, s in sorted(out.items())}


def _quality_summary(s: dict[str, Any]) -> dict[str, Any]:
    per_trait = {}
    for trait, rows in sorted(s["by_trait"].items()):
        n = sum(sum(row.values()) for row in rows.values())
        right = sum(row.get(value, 0) for value, row in rows.items())
        per_trait[trait] = {"accuracy": round(right / n, 4), "n": n}
    return {
        "records": s["records"],
        "named": round(s["named_right"] / max(1, s["values"]), 4),
        "values": s["values"],
        "per_trait": per_trait,
        "confusion": s["by_trait"],
        "extra_per_record": round(s["extra"] / max(1, s["records"]), 4),
        "follows": round(s["followed"] / s["stated"], 4) if s["stated"] else None,
        "stated": s["stated"],
    }


def _decider(domain: Domain, personas: Sequence[dict[str, Any]]):
    """A function (features of chosen, features of rejected) -> per-persona sign of the reward gap."""
    if type(domain).score is Domain.score:  # a linear reward: one matrix product for every persona
        weights = np.stack([domain.weights(t) for t in personas])
        return lambda a, b: np.sign(weights @ (a - b))

    def decide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sign(np.array([float(np.subtract(*domain.score(t, np.stack([a, b])))) for t in personas]))

    return decide


def shot_ceiling(
    users: Mapping[str, User],
    episodes: Mapping[str, Sequence[Episode]],
    max_shots: int,
    eps: float = 0.05,
    hypotheses: Literal["population", "train"] = "population",
) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {n: {"accuracy", "ci_low", "ci_high", "n"}}}`` for n = 0..max_shots (see the module)."""
    if not 0 < eps < 0.5:
        raise UserError(f"eps must be in (0, 0.5), got {eps}")
    domain = _domain_of(users)
    chosen = [
        u for u in users.values() if "traits" in (u.metadata or {})
        and (hypotheses == "population" or (u.metadata or {}).get("split") != "test")
    ]  # fmt: skip
    # Personas that differ only by name decide alike: one hypothesis each, weighted by their count.
    counts: dict[str, int] = defaultdict(int)
    for u in chosen:
        counts[json.dumps(u.metadata["traits"], sort_keys=True)] += 1
    personas = [domain.check_traits(json.loads(k)) for k in counts]
    log_prior = np.log(np.array(list(counts.values()), dtype=np.float64))
    decide = _decider(domain, personas)
    log_fit, log_miss = np.log(1 - eps), np.log(eps)

    def votes(pref) -> np.ndarray:
        feats = domain.features(pref.question, [pref.chosen, pref.rejected])
        return decide(feats[0], feats[1])  # > 0: the persona orders the pair as the user did

    result: dict[str, dict[str, dict[str, float]]] = {}
    for split, eps_of_split in episodes.items():
        outcomes: dict[int, list[float]] = defaultdict(list)
        for ep in eps_of_split:
            query = votes(ep.query)
            shots = [votes(s) for s in ep.shots[:max_shots]]
            log_post = log_prior.copy()
            for n in range(len(shots) + 1):
                if n:
                    log_post += np.where(shots[n - 1] > 0, log_fit, log_miss)
                post = np.exp(log_post - log_post.max())
                post /= post.sum()
                right = post[query > 0].sum() + 0.5 * post[query == 0].sum()
                outcomes[n].append(1.0 if right > 0.5 + 1e-12 else 0.0 if right < 0.5 - 1e-12 else 0.5)
        result[split] = {}
        for n, outs in sorted(outcomes.items()):
            lo, hi = wilson_interval(sum(outs), len(outs))
            result[split][str(n)] = {
                "accuracy": round(float(np.mean(outs)), 4),
                "ci_low": round(lo, 4),
                "ci_high": round(hi, 4),
                "n": len(outs),
            }
    return result


def winrate_ceiling(
    users: Mapping[str, User], records: Iterable[Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``{split: {"win_rate", "ci", "n"}}``: the win rate an ideal answer (`Domain.ideal_reward`: fully
    relevant, carrying every one of the user's trait values) would get against one opponent's
    generation records, split ``all`` and the win rates' split names (``unseen``, ``seen``).

    Each record is judged as the exact judge judges a pair: the ideal answer's reward against the
    record's answer's, by `fspo.sim.reward.prefer_rewards` (win 1, tie 0.5, loss 0); the pooled rate
    carries the win rates' Wilson interval, ties half. An opponent whose answers already satisfy its
    users ties the ideal, so this is the most any system can win against it: read a win rate
    against that opponent as a share of it.
    """
    domain = _domain_of(users)
    verdicts: dict[str, list[float]] = defaultdict(list)
    systems: set[Any] = set()
    for rec in records:
        systems.add(rec.get("system"))
        if len(systems) > 1:
            raise UserError(
                f"win-rate ceiling: records of several systems ({', '.join(sorted(map(str, systems)))}); "
                "a ceiling is per opponent, give one system's generations"
            )
        traits = _traits_of(domain, users, rec)
        answer = domain.reward(traits, rec["question"], rec["answer"])
        verdict = prefer_rewards(domain.ideal_reward(traits, rec["question"]), answer, TIE_MARGIN)
        verdicts["all"].append(verdict)
        split = rec.get("split")
        if split:
            verdicts[SPLIT_NAMES.get(split, split)].append(verdict)
    out: dict[str, dict[str, Any]] = {}
    for split, scores in verdicts.items():
        low, high = wilson_interval(sum(scores), len(scores))
        out[split] = {
            "win_rate": round(sum(scores) / len(scores), 4),
            "ci": [round(low, 4), round(high, 4)],
            "n": len(scores),
        }
    return out
