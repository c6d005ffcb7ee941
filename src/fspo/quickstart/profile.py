"""The quickstart's profile: sizes and budgets of one run, read from layered YAML files.

The training runs' settings are not fields of their own here: the profile holds *overrides* of
`TrainConfig` (`fspo.train.config`), layered as everywhere else (the config's defaults, the stage's
recipe, then these), so a value means the same in a profile, a `--config` file and a `fspo train` flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fspo.core.errors import UserError
from fspo.eval import systems as registry
from fspo.sim.corpus import StyledLayout

# Profile fields that hold `TrainConfig` overrides: merged key by key across the profile's layers
# (a size profile that sets `sft: {max_steps: 3}` keeps default.yaml's `sft.lr`). Every other field,
# `sim_options` included, is replaced whole by the layer that sets it.
TRAIN_TABLES = ("train", "sft", "fspo", "trainings")


class Profile(BaseModel):
    """Sizes and budgets of one quickstart run: the schema of ``fspo/configs/quickstart/*.yaml``.

    The values, and why each is what it is, live in those files (`load_profile`) and are not
    repeated here: every field is required, ``default.yaml`` names them all, other profiles override some.
    `train`, `sft` and `fspo` are `TrainConfig` overrides of every training, of the SFT-stage ones and
    of the FSPO-stage ones; `trainings` overrides one training by name (`fspo.eval.systems.TRAININGS`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str
    users: int
    prefs_per_user: int
    sim_options: dict[str, Any]
    shots: int
    questions_per_context: Annotated[int, Field(ge=1)]
    include_dispreferred: bool
    also_shots: tuple[int, ...]
    seed: int
    model_size: str
    corpus_docs: int
    corpus_consistent: float
    corpus_consistent_answers: int
    corpus_described: float
    corpus_styled: float
    corpus_styled_answers: int
    corpus_styled_layout: StyledLayout
    template_docs: int
    pretrain_steps: int
    train: dict[str, Any]
    sft: dict[str, Any]
    fspo: dict[str, Any]
    trainings: dict[str, dict[str, Any]]
    rat_pairs_samples: int
    eval_episodes: int
    accuracy_shots: tuple[int, ...]
    max_new_tokens: int
    gen_batch_size: int
    onpolicy: dict[str, Any]
    decoding: dict[str, Any]
    best_of: Annotated[int, Field(ge=1)]
    best_of_curve: tuple[int, ...]

    @field_validator("onpolicy")
    @classmethod
    def _onpolicy_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted({"model", "episodes", "users", "out", "judge"} & set(value))
        if taken:
            raise ValueError(f"{', '.join(taken)}: set by the quickstart (its FSPO model, data, simulator)")
        return value

    @field_validator("decoding")
    @classmethod
    def _a_decoding(cls, value: dict[str, Any]) -> dict[str, Any]:
        from fspo.infer.generate import Decoding

        if "seed" in value:
            raise ValueError("the decoding's seed is the profile's `seed`")
        Decoding.of("decoding", **value)  # a bad field is named
        return value

    @field_validator("best_of_curve")
    @classmethod
    def _curve_within_best_of(cls, value: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        most = info.data.get("best_of", 1)
        if any(k < 1 or k > most for k in value):
            raise ValueError(f"every N must be between 1 and best_of ({most})")
        return value

    def generation_decoding(self) -> Any:
        """The one decoding every system generates with (`fspo.infer.generate.Decoding`)."""
        from fspo.infer.generate import Decoding

        return Decoding.of("profile field 'decoding'", seed=self.seed, **self.decoding)

    @field_validator("trainings")
    @classmethod
    def _known_trainings(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        names = [t.name for t in registry.TRAININGS]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(
                f"unknown training(s) {', '.join(unknown)}; the trainings are {', '.join(names)}"
            )
        for name, table in value.items():
            _no_contexts_in(table, f"trainings.{name}")
        return value

    @field_validator("train", "sft", "fspo")
    @classmethod
    def _no_contexts(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        _no_contexts_in(value, str(info.field_name))
        return value

    @field_validator("rat_pairs_samples", "eval_episodes", "max_new_tokens", "gen_batch_size", "users")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value


def _no_contexts_in(table: dict[str, Any], name: str) -> None:
    # K questions per context needs episodes built with K queries per shot set: the quickstart's
    # stage `contexts` builds them from the profile field, so the trainings' K is that field alone.
    if "questions_per_context" in table:
        raise ValueError(
            f"{name}.questions_per_context: set the profile field `questions_per_context` instead "
            "(the episodes are built for it)"
        )


def domains() -> list[str]:
    """The domains a quickstart can run: every registered simulator (`fspo.sim.registry`)."""
    from fspo.sim import domain_names

    return domain_names()


def load_profile(
    name: str = "default",
    domain: str | None = None,
    config: str | Path | None = None,
    seed: int | None = None,
    shots: int | None = None,
) -> Profile:
    """A run's profile, each layer overriding the fields it names: ``quickstart/default.yaml``, the
    domain's population (``quickstart/domains/<domain>.yaml``, where the domain ships one), the size
    profile `name` (e.g. tiny), a `config` file of the user's (YAML/JSON; a key that is no profile
    field is an error naming it), then `seed` and `shots`. More shots than the accuracy curve reaches
    extend it to `shots`. Every training's config is built once here, so a bad override fails now,
    naming its field, not after an hour of earlier stages."""
    from fspo.core.files import read_fields
    from fspo.train.config import NAMED_CONFIGS, named_config

    values = named_config("quickstart", "default")
    if domain is not None:
        if domain not in domains():
            raise UserError(f"--domain: unknown domain {domain!r}; choose one of {', '.join(domains())}")
        if (NAMED_CONFIGS / "quickstart" / "domains" / f"{domain}.yaml").is_file():
            values = _merge(values, named_config("quickstart/domains", domain))
        else:  # a domain registered from outside the package carries its layer
            from fspo.sim.registry import domain_class

            values = _merge(values, {**domain_class(domain).quickstart_profile, "domain": domain})
    if name != "default":
        values = _merge(values, named_config("quickstart", name))
    given: dict[str, Any] = {}
    if config is not None:
        given = read_fields(config)
        unknown = sorted(set(given) - set(Profile.model_fields))
        if unknown:
            raise UserError(
                f"config file {str(config)!r}: unknown profile field(s) {', '.join(unknown)} "
                "(the fields are those of fspo/configs/quickstart/default.yaml)"
            )
        values = _merge(values, given)
    if seed is not None:
        values["seed"] = seed
    if shots is not None:
        values["shots"] = shots
        values["accuracy_shots"] = sorted({k for k in values["accuracy_shots"] if k <= shots} | {shots})
    too_many = [k for k in values["also_shots"] if k >= values["shots"]]
    if too_many and "also_shots" in given:
        raise UserError(
            f"config file {str(config)!r}: also_shots {too_many} must be below shots ({values['shots']})"
        )
    # A built-in layer's extra shot counts that a smaller `shots` leaves no room for are dropped:
    # FSPO with as many shots as the episode holds is `fspo` itself.
    values["also_shots"] = [k for k in values["also_shots"] if k < values["shots"]]
    where = f"config file {str(config)!r}" if config is not None else f"quickstart profile {name!r}"
    try:
        profile = Profile.model_validate(values)
    except ValidationError as err:
        raise UserError(f"{where}: {err}") from None
    _check_trainings(profile, where)
    return profile


def _merge(values: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key, value in layer.items():
        if key in TRAIN_TABLES and isinstance(value, dict) and isinstance(out.get(key), dict):
            if key == "trainings":
                out[key] = {**out[key], **{n: {**out[key].get(n, {}), **v} for n, v in value.items()}}
            else:
                out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _check_trainings(p: Profile, where: str) -> None:
    from fspo.quickstart.trainings import training_configs

    try:
        training_configs(p, "model", Path("episodes"), Path("out"))
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def default_out(domain: str | None, seed: int | None, shots: int | None, config: str | Path | None) -> str:
    """``runs/quickstart``, named after what was chosen: ``runs/quickstart-reviews-seed1``."""
    parts = ["quickstart"]
    parts += [domain] if domain else []
    parts += [f"seed{seed}"] if seed is not None else []
    parts += [f"{shots}shots"] if shots is not None else []
    parts += [Path(config).stem] if config is not None else []
    return str(Path("runs") / "-".join(parts))
