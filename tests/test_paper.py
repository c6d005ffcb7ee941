"""`fspo paper` and the layered quickstart profiles it runs: which fields each layer sets, the errors a
user's config file gets, one tiny domain end to end (its report's targets computed from its own
numbers, a second call served from the stage cache), and the seeds' aggregation."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI_ENV, FSPO_CLI
from fspo.core.errors import UserError
from fspo.core.stages import MARKER
from fspo.eval.stats import wilson_interval
from fspo.paper import (
    PAPER,
    TARGET_CEILING_SHARE,
    TARGET_CI_LOW,
    TARGET_TRAIT_SHARE,
    aggregate,
    render,
    run_paper,
)
from fspo.quickstart import default_out, domains, generated_systems, load_profile

# --- load_profile: the layers ---------------------------------------------------------------------------


def test_each_domain_layer_sets_its_population():
    default = load_profile()
    assert default.domain == "roleplay" and default.sim_options["holdout"] == "users"

    roleplay = load_profile(domain="roleplay")
    assert roleplay.domain == "roleplay"
    o = roleplay.sim_options
    assert o["holdout"] == "combinations" and o["pairing"] == "minimal"
    assert (o["min_traits"], o["max_traits"]) == (2, 3) and len(set(o["traits"])) >= 4
    assert roleplay.shots == 8 and max(roleplay.accuracy_shots) == 8

    reviews = load_profile(domain="reviews")
    assert reviews.domain == "reviews" and "test_fraction" in reviews.sim_options
    assert reviews.shots == 8 and reviews.also_shots == (4,)
    assert [s.name for s in generated_systems(reviews)][-2:] == ["fspo-4-shots", "fspo-rat-4-shots"]

    elix = load_profile(domain="elix")
    assert elix.domain == "elix" and elix.shots == 4 and elix.also_shots == (1, 2)  # the default's
    # Sizes the domain layers do not name stay the default's.
    assert elix.users == reviews.users == default.users


def test_the_size_profile_applies_on_top_of_a_domain():
    tiny = load_profile("tiny")
    tiny_elix = load_profile("tiny", domain="elix")
    assert tiny_elix.domain == "elix" and tiny_elix.sim_options == load_profile(domain="elix").sim_options
    for field in ("users", "model_size", "pretrain_steps", "shots", "eval_episodes", "accuracy_shots"):
        assert getattr(tiny_elix, field) == getattr(tiny, field), field


@pytest.mark.parametrize("name, shots", [("tiny", None), ("default", 4), ("default", 2)])
def test_also_shots_stay_below_the_shots(name, shots):
    p = load_profile(name, domain="reviews", shots=shots)
    assert all(k < p.shots for k in p.also_shots), (p.shots, p.also_shots)


def test_a_config_asking_for_more_shots_than_the_episodes_hold_is_refused(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("shots: 4\nalso_shots: [4]\n")
    with pytest.raises(UserError, match=r"also_shots.*mine.yaml|mine.yaml.*also_shots"):
        load_profile("default", domain="reviews", config=config)


def test_seed_and_shots_override_and_shots_reshape_the_accuracy_curve():
    p = load_profile(domain="elix", seed=3, shots=8)  # elix: accuracy_shots [0, 2, 4]
    assert (p.seed, p.shots) == (3, 8)
    assert p.accuracy_shots == (0, 2, 4, 8)
    fewer = load_profile(domain="reviews", shots=3)  # reviews: accuracy_shots [0, 2, 4, 8]
    assert fewer.shots == 3 and fewer.accuracy_shots == (0, 2, 3)


def test_a_config_file_overrides_any_field_last_but_for_seed_and_shots(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("users: 77\nfspo: {beta: 0.25}\nseed: 5\nsim_options:\n  test_fraction: 0.5\n")
    p = load_profile("tiny", domain="reviews", config=config)
    assert (p.users, p.fspo["beta"], p.seed, p.domain) == (77, 0.25, 5, "reviews")
    # A training table merges key by key: tiny's step budget and default's rate stay.
    assert p.fspo["max_steps"] == load_profile("tiny").fspo["max_steps"] and p.fspo["lr"] == 1e-4
    assert p.sim_options == {"test_fraction": 0.5}
    assert p.model_size == load_profile("tiny").model_size  # the fields it does not name stay
    assert load_profile("tiny", config=config, seed=9).seed == 9
    as_json = tmp_path / "mine.json"
    as_json.write_text(json.dumps({"fspo": {"max_steps": 7}}))
    assert load_profile(config=as_json).fspo["max_steps"] == 7


def test_a_config_key_that_is_no_profile_field_is_named_with_its_file(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("users: 10\nuserz: 20\nlearning_rate: 0.1\n")
    with pytest.raises(UserError) as err:
        load_profile(config=config)
    message = str(err.value)
    assert "userz" in message and "learning_rate" in message and str(config) in message
    assert "users," not in message  # the known field is not reported as unknown


def test_a_wrong_typed_config_value_names_the_file_and_field(tmp_path):
    config = tmp_path / "typed.yaml"
    config.write_text("users: many\n")
    with pytest.raises(UserError) as err:
        load_profile(config=config)
    assert str(config) in str(err.value) and "users" in str(err.value)
    config.write_text("- users\n")  # not an object of fields
    with pytest.raises(UserError, match="typed.yaml"):
        load_profile(config=config)


@pytest.mark.parametrize(
    "text, field",
    [
        ("questions_per_context: 0\n", "questions_per_context"),
        ("questions_per_context: -2\n", "questions_per_context"),
        ("questions_per_context: four\n", "questions_per_context"),
        ("fspo: {questions_per_context: 4}\n", "fspo.questions_per_context"),
        ("train: {questions_per_context: 2}\n", "train.questions_per_context"),
        ("trainings: {fspo_rat: {questions_per_context: 2}}\n", "trainings.fspo_rat.questions_per_context"),
    ],
)
def test_a_bad_questions_per_context_names_its_field(tmp_path, text, field):
    config = tmp_path / "k.yaml"
    config.write_text(text)
    with pytest.raises(UserError) as err:
        load_profile(config=config)
    assert str(config) in str(err.value) and field in str(err.value), str(err.value)


def test_questions_per_context_reaches_the_few_shot_fspo_trainings_only(tmp_path):
    from fspo.quickstart.trainings import CONTEXTS, training_configs

    config = tmp_path / "k.yaml"
    config.write_text("questions_per_context: 4\n")
    p = load_profile(config=config)
    plain = training_configs(load_profile(), "m", tmp_path / "episodes", tmp_path)
    cfgs = training_configs(p, "m", tmp_path / "episodes", tmp_path)
    for name in ("fspo", "fspo_rat"):  # K questions share one shot set, read from the K-block file
        assert cfgs[name].questions_per_context == 4 and cfgs[name].episodes == str(
            tmp_path / CONTEXTS / "train.jsonl"
        )
        assert cfgs[name].batch_size == plain[name].batch_size  # contexts per step; 4x the pairs
    for name in ("sft", "sft_rat", "pop_sft", "fspo_rat_pairs"):
        assert cfgs[name].questions_per_context == 1 and cfgs[name] == plain[name], name
    # Population IPO sees as many pairs per step as FSPO: its batch grows by K.
    assert cfgs["pop_ipo"].questions_per_context == 1
    assert cfgs["pop_ipo"].batch_size == 4 * plain["pop_ipo"].batch_size


def test_an_unknown_domain_names_the_choices():
    with pytest.raises(UserError) as err:
        load_profile(domain="poetry")
    assert "'poetry'" in str(err.value) and all(d in str(err.value) for d in domains())
    with pytest.raises(UserError, match="poetry.*choose from elix, reviews, roleplay"):
        run_paper("unused", ["reviews", "poetry"], [0], profile="tiny")


def test_default_out_names_what_was_chosen():
    assert default_out(None, None, None, None) == str(Path("runs/quickstart"))
    assert default_out("reviews", 1, None, None) == str(Path("runs/quickstart-reviews-seed1"))
    assert default_out("elix", None, 8, "configs/big.yaml") == str(Path("runs/quickstart-elix-8shots-big"))
    assert default_out(None, 0, None, None) == str(Path("runs/quickstart-seed0"))  # seed 0 is a choice too


def _fspo(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(FSPO_CLI + args, env=CLI_ENV, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, files, expect",
    [
        (["quickstart", "--config", "bad.yaml"], {"bad.yaml": "users: 5\nshotz: 4\n"}, ["shotz", "bad.yaml"]),
        (["quickstart", "--domain", "poetry"], {}, ["poetry", "elix, reviews, roleplay"]),
        (["paper", "--seeds", "0,x", "--profile", "tiny"], {}, ["--seeds", "0,x"]),
        (
            ["paper", "--profile", "tiny", "--config", "k.yaml"],
            {"k.yaml": "questions_per_context: 0\n"},
            ["k.yaml", "questions_per_context"],
        ),
    ],
    ids=["unknown-config-key", "unknown-domain", "bad-seeds", "paper-bad-config"],
)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, files, expect):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    done = _fspo(args, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    for word in expect:
        assert word in output, (word, output)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no runs/ folder made


# --- run_paper on one tiny domain ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    first = run_paper(out, ["reviews"], [0], profile="tiny")
    first_json = (out / "report" / "paper.json").read_text()
    markers = {p: p.stat().st_mtime_ns for p in out.glob(f"*/*/{MARKER}")}
    start = time.perf_counter()
    second = run_paper(out, ["reviews"], [0], profile="tiny")
    seconds = time.perf_counter() - start
    # No stage re-ran: every stage marker is the first call's.
    assert markers and {p: p.stat().st_mtime_ns for p in out.glob(f"*/*/{MARKER}")} == markers
    return out, first, first_json, second, seconds


def test_paper_writes_its_report_with_the_papers_systems(paper_run):
    out, result, first_json, _, _ = paper_run
    assert json.loads(first_json) == json.loads(json.dumps(result))
    assert result["profile"] == "tiny" and result["seeds"] == [0] and list(result["domains"]) == ["reviews"]
    agg = result["domains"]["reviews"]
    assert agg["seeds"] == [0] and len(agg["minutes"]) == 1 and agg["minutes"][0] > 0
    assert (out / "reviews-seed0" / "report" / "report.md").exists()
    for split, cells in PAPER["reviews"].items():
        for system in cells:
            if system == "fspo-4-shots":  # the tiny profile's 2 shots leave no room for FSPO at 4
                assert f"{system} vs base" not in agg["winrates"]
                continue
            cell = agg["winrates"][f"{system} vs base"][split]
            assert 0 <= cell["ci"][0] <= cell["mean"] <= cell["ci"][1] <= 1 and cell["n"] > 0, (system, split)
    md = (out / "report" / "paper.md").read_text()
    assert "## reviews" in md and "| fspo |" in md and "80.4%" in md  # the paper's cell beside ours
    for target in agg["targets"]:
        assert target in md


def test_paper_targets_are_computed_from_the_numbers_beside_them(paper_run):
    _, result, _, _, _ = paper_run
    agg = result["domains"]["reviews"]
    targets = agg["targets"]
    assert set(targets.values()) <= {True, False, None}
    by_prefix = {t.split(" (")[0].split(" reaches")[0].split(" carry")[0]: v for t, v in targets.items()}
    pop = agg["winrates"]["fspo vs population-ipo"]["unseen"]
    no_shots = agg["winrates"]["fspo vs fspo-no-shots"]["unseen"]
    assert by_prefix["FSPO beats population IPO on unseen users"] == (pop["ci"][0] > TARGET_CI_LOW)
    assert by_prefix["FSPO beats itself without shots on unseen users"] == (no_shots["ci"][0] > TARGET_CI_LOW)
    share = agg["trait_share_unseen"]["fspo"]
    assert share is not None and 0 <= share <= 1
    assert by_prefix["FSPO's answers"] == (share >= TARGET_TRAIT_SHARE)
    assert 0 < agg["ceiling_unseen"] <= 1 and 0 <= agg["accuracy_unseen"] <= 1
    assert agg["ceiling_share"] == pytest.approx(agg["accuracy_unseen"] / agg["ceiling_unseen"])
    assert by_prefix["FSPO's accuracy at the most shots"] == (agg["ceiling_share"] >= TARGET_CEILING_SHARE)
    assert "fspo vs fspo-4-shots" not in agg["winrates"]  # tiny: 2 shots, so no 4-shot system
    assert not any(t.startswith("Interpolated users") for t in agg["targets"])


def test_a_second_paper_call_is_served_from_the_stage_cache(paper_run):
    out, first, first_json, second, seconds = paper_run
    assert second == first
    assert (out / "report" / "paper.json").read_text() == first_json
    assert seconds < 10, f"the cached call took {seconds:.1f} s"


# --- aggregate over seeds --------------------------------------------------------------------------------


def _summary(seed: int, pop_rate: float, pop_n: int, share: float, acc: float, ceiling: float) -> dict:
    return {
        "seed": seed,
        "minutes": 1.25 + seed,
        "winrates": {
            "fspo vs population-ipo": {"unseen": {"win_rate": pop_rate, "ci": [0, 1], "n": pop_n}},
            "fspo vs fspo-no-shots": {"unseen": {"win_rate": 0.5, "ci": [0, 1], "n": 10}},
            "fspo vs base": {"seen": {"win_rate": 1.0, "ci": [0, 1], "n": 4}},
        },
        "trait_shares": {
            "fspo": {"test_unseen": {"trait_share": share, "relevance": 1.0, "n": 10}},
            "population-ipo": {"test_seen": {"trait_share": 0.5, "relevance": 1.0, "n": 10}},
        },
        "ceiling": {
            "test_unseen": {"0": {"accuracy": 0.5}, "2": {"accuracy": 0.8}, "10": {"accuracy": ceiling}}
        },
        "accuracy": {"fspo": {"test_unseen": acc, "test_seen": 0.1}},
    }


def test_aggregate_pools_seeds_mean_spread_and_one_wilson_interval():
    runs = [_summary(0, 0.75, 40, 0.9, 0.8, 1.0), _summary(1, 0.875, 80, 1.0, 0.9, 0.9)]
    agg = aggregate("elix", runs)
    cell = agg["winrates"]["fspo vs population-ipo"]["unseen"]
    assert cell["mean"] == pytest.approx((0.75 + 0.875) / 2)  # seeds weigh alike in the mean
    assert (cell["min"], cell["max"], cell["n"]) == (0.75, 0.875, 120)
    assert cell["ci"] == pytest.approx(list(wilson_interval(0.75 * 40 + 0.875 * 80, 120)))  # pairs pooled
    assert agg["winrates"]["fspo vs base"]["seen"]["n"] == 8
    assert agg["seeds"] == [0, 1] and agg["minutes"] == [1.2, 2.2]
    assert agg["trait_share_unseen"]["fspo"] == pytest.approx(0.95)
    assert agg["trait_share_unseen"]["population-ipo"] is None  # no unseen split: no number, not zero
    # The ceiling is the curve's point at the most shots ("10" sorts before "2" as text).
    assert agg["ceiling_unseen"] == pytest.approx(0.95)
    assert agg["accuracy_unseen"] == pytest.approx(0.85)
    assert agg["ceiling_share"] == pytest.approx((0.8 / 1.0 + 0.9 / 0.9) / 2)  # 0.9: the target's bound, met
    t = list(agg["targets"].values())
    lo = cell["ci"][0]
    assert t[:4] == [lo > TARGET_CI_LOW, False, True, True]
    assert t[4:] == [None] * 5  # no oracle or RAT numbers in these runs: their targets say n/a, not met
    assert len(agg["targets"]) == 9  # no fewer-shots system: no 8-vs-4 target
    # No oracle: nothing says whether the model can write; reading is 0.9 of the ceiling, at target.
    assert agg["limits"]["write"] == {"trait_share": None, "relevance": None}
    assert agg["limits"]["holding"] == []


def test_aggregate_without_a_number_says_so_and_render_marks_it():
    run = _summary(0, 0.9, 50, 0.5, 0.4, 0.8)
    del run["winrates"]["fspo vs fspo-no-shots"]
    run["ceiling"] = {}
    agg = aggregate("roleplay", [run])
    targets = list(agg["targets"].values())
    assert targets[1] is None and targets[2] is False and targets[3] is None
    assert agg["accuracy_unseen"] is None and agg["ceiling_share"] is None
    md = render({"profile": "p", "seeds": [0], "domains": {"roleplay": agg}})
    assert "## roleplay" in md and "paper: held-out users" in md and "90.3%" in md
    assert md.count(": n/a") == 2 + 5 and md.count("**not met**") == 1  # + the oracle's and RAT's targets
    assert "| roleplay | - | - | - | 50.0% |" in md  # the limits table says what it lacks


def test_aggregate_rat_targets_from_descriptions_and_win_rates():
    def cell(rate: float, lo: float, hi: float) -> dict:
        return {"unseen": {"win_rate": rate, "ci": [lo, hi], "n": 100}}

    runs = []
    for seed, named in ((0, 0.92), (1, 0.96)):
        run = _summary(seed, 0.7, 100, 0.9, 0.8, 1.0)
        run["winrates"] |= {
            "fspo-rat vs population-ipo": cell(0.60, 0.5, 0.7),
            "oracle vs population-ipo": cell(0.62, 0.52, 0.72),
            "oracle vs fspo-no-shots": cell(0.9, 0.82, 0.95),
            "fspo-rat vs fspo": cell(0.45, 0.36, 0.55),
            "fspo-rat-2-shots vs fspo-2-shots": cell(0.6, 0.5, 0.7),
        }
        run["descriptions"] = {"fspo-rat": {"test_unseen": {"named": named}}}
        runs.append(run)
    agg = aggregate("roleplay", runs)
    assert agg["descriptions_named_unseen"] == pytest.approx(0.94)
    assert agg["oracle_recovered"] == pytest.approx(0.60 / 0.62)
    by_prefix = {t.split(" at least")[0].split(" (")[0]: v for t, v in agg["targets"].items()}
    assert by_prefix["FSPO+RAT's descriptions name"] is True
    assert by_prefix["The oracle"] is True
    assert by_prefix["FSPO+RAT recovers"] is True  # 96.8% of the oracle's win rate
    # An oracle that does not beat population IPO is no bar to recover: n/a, not met.
    for run in runs:
        run["winrates"]["oracle vs population-ipo"] = cell(0.45, 0.36, 0.55)
    assert aggregate("roleplay", runs)["oracle_recovered"] is None
    assert by_prefix["FSPO+RAT beats FSPO"] is False  # 45% [36, 55]: not above 50%
    md = render({"profile": "p", "seeds": [0, 1], "domains": {"roleplay": agg}})
    assert "| fspo-rat-2-shots vs fspo-2-shots | 60.0%" in md and "name 94.0% of unseen" in md


def test_limits_separate_writing_from_reading():
    """The oracle's answers say whether the model can write a user's values; FSPO's accuracy against the
    shot ceiling whether it reads them; each limit below its target is named, computed from the numbers."""

    def run(seed: int, oracle_share: float, oracle_relevance: float, acc: float) -> dict:
        summary = _summary(seed, 0.7, 100, 0.6, acc, 1.0)
        summary["trait_shares"]["oracle"] = {
            "test_unseen": {"trait_share": oracle_share, "relevance": oracle_relevance, "n": 10}
        }
        return summary

    agg = aggregate("reviews", [run(0, 0.95, 0.9, 0.95), run(1, 0.91, 0.82, 0.97)])
    lim = agg["limits"]
    assert lim["write"] == {"trait_share": pytest.approx(0.93), "relevance": pytest.approx(0.86)}
    assert lim["read"]["share"] == pytest.approx(0.96) and lim["both"]["trait_share"] == pytest.approx(0.6)
    assert lim["holding"] == []
    oracle = next(v for t, v in agg["targets"].items() if t.startswith("The oracle's answers carry"))
    assert oracle is True

    weak_writer = aggregate(
        "reviews", [run(0, 0.95, 0.5, 0.5)]
    )  # on topic too rarely; reads half the ceiling
    assert weak_writer["limits"]["holding"] == ["write", "read"]
    md = render({"profile": "p", "seeds": [0], "domains": {"reviews": weak_writer}})
    assert "| reviews | 95.0% | 0.50 | 0.50 / 1.00 (50.0%) | 60.0% |" in md and "| write, read |" in md
