"""Named configs are data over `TrainConfig`'s defaults: the recipes of `fspo train`, the quickstart's
profiles, and the prompt layout a trained model's saved config implies."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fspo.core.errors import UserError
from fspo.data.template import DescriptionMode, TemplateOptions
from fspo.infer.layout import CONFIG_FILE, trained_layout
from fspo.quickstart import Profile, load_profile
from fspo.train.config import NAMED_CONFIGS, TrainConfig, make_config, named_config, recipe

REQUIRED = {"model": "m", "episodes": "e"}


def _names(kind: str) -> list[str]:
    return sorted(
        f.name.removesuffix(".yaml") for f in (NAMED_CONFIGS / kind).iterdir() if f.name.endswith(".yaml")
    )


def test_recipes_override_only_what_differs_from_the_defaults():
    assert _names("recipes") == ["fspo", "sft"]
    defaults = {k: f.get_default(call_default_factory=True) for k, f in TrainConfig.model_fields.items()}
    for stage in ("sft", "fspo"):
        values = recipe(stage)
        assert values["stage"] == stage
        assert set(values) <= set(TrainConfig.model_fields)
        same = [k for k, v in values.items() if k != "stage" and defaults[k] == v]
        assert not same, f"{stage}: {same} repeat TrainConfig's defaults"
        make_config({**values, **REQUIRED})  # every recipe is a valid config
    assert recipe("sft") == {"stage": "sft", "lr": 1e-3, "scheduler": "cosine"}
    assert recipe("fspo") == {"stage": "fspo", "beta": 0.5, "lr": 3e-4, "scheduler": "cosine"}


@pytest.fixture
def resolved(monkeypatch):
    """`fspo train STAGE ARGS... --print-config` -> the config the training loop would get."""
    import fspo.train.cli as cli

    seen = []
    monkeypatch.setattr(cli, "show_config", lambda r, title: seen.append(r.config))

    def run(stage: str, *args: str) -> TrainConfig:
        result = CliRunner().invoke(
            cli.app, [stage, "--model", "m", "--episodes", "e", *args, "--print-config"]
        )
        assert seen, result.output
        return seen.pop()

    return run


def test_train_cli_starts_from_the_recipe_and_options_override_it(resolved):
    cfg = resolved("fspo")
    assert (cfg.beta, cfg.lr, cfg.scheduler, cfg.loss) == (0.5, 3e-4, "cosine", "ipo")
    cfg = resolved("fspo", "--lr", "0.01", "--scheduler", "linear")
    assert (cfg.beta, cfg.lr, cfg.scheduler) == (0.5, 0.01, "linear")
    assert resolved("sft").model_dump() == make_config({**recipe("sft"), **REQUIRED}).model_dump()


def test_a_config_file_lies_between_the_recipe_and_the_flags(resolved, tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("beta: 0.3\nmax_steps: 7\n")
    cfg = resolved("fspo", "--config", str(partial), "--max-steps", "9")
    # The file's fields override the recipe's, the flags the file's; the rest is the recipe's.
    assert (cfg.beta, cfg.max_steps, cfg.lr, cfg.scheduler) == (0.3, 9, 3e-4, "cosine")


def test_profiles_are_the_default_file_with_each_profile_on_top():
    assert {"default", "tiny"} <= set(_names("quickstart"))
    default = named_config("quickstart", "default")
    assert set(default) == set(Profile.model_fields)  # the default profile names every field
    for name in _names("quickstart"):
        assert set(named_config("quickstart", name)) <= set(Profile.model_fields)
        load_profile(name)
    for domain in _names("quickstart/domains"):  # the paper's populations, each a valid layer
        assert set(named_config("quickstart/domains", domain)) <= set(Profile.model_fields)
        assert load_profile("default", domain=domain).domain == domain
    tiny = load_profile("tiny")
    assert (tiny.model_size, tiny.pretrain_steps, tiny.accuracy_shots) == ("tiny", 4, (0, 1, 2))
    assert tiny.sim_options == default["sim_options"] and tiny.fspo["beta"] == default["fspo"]["beta"]


def test_unknown_profile_names_the_choices():
    with pytest.raises(UserError, match="choose one of default, tiny"):
        load_profile("huge")


@pytest.mark.parametrize(
    ("rat", "description"),
    [
        ("none", DescriptionMode.NONE),
        ("target", DescriptionMode.TARGET),
        ("teacher-forced", DescriptionMode.PROMPT),
    ],
)
def test_trained_layout_is_the_training_layout_without_its_budget(tmp_path, rat, description):
    cfg = TrainConfig(**REQUIRED, rat=rat, include_dispreferred=False, chat_template=True, max_tokens=512)
    cfg.save(tmp_path / CONFIG_FILE)
    layout = trained_layout(tmp_path)
    assert layout == cfg.template_options().model_copy(update={"max_tokens": None})
    assert layout == TemplateOptions(include_dispreferred=False, description=description, chat_template=True)
    assert trained_layout(tmp_path, include_dispreferred=True).include_dispreferred is True


def test_trained_layout_of_a_bad_config_is_a_user_error(tmp_path):
    assert trained_layout(tmp_path) == TemplateOptions()  # no saved config: a base model
    path = tmp_path / CONFIG_FILE
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        trained_layout(tmp_path)
    path.write_text(json.dumps({**TrainConfig(**REQUIRED).model_dump(mode="json"), "rat": "sometimes"}))
    with pytest.raises(UserError, match="rat"):
        trained_layout(tmp_path)
