"""The prompt layout a trained model expects, read from the training config saved in its folder.

Why: a model fine-tuned on shots without dispreferred answers, inside a chat template, or with RAT's
description must be prompted the same way when it is evaluated or served; the default layout would
silently score or generate from prompts it never saw. Reading the saved config here, below `train`,
lets evaluation and the server share it without importing the training code; the field -> layout
mapping itself is `TemplateOptions.of_training`, which `TrainConfig.template_options` uses too.
"""

from __future__ import annotations

from pathlib import Path

from fspo.core.errors import UserError
from fspo.core.files import read_fields
from fspo.data.template import TemplateOptions

# The file a training run saves its whole config under, in its run folder and in its model folder.
CONFIG_FILE = "fspo_config.json"
LAYOUT_FIELDS = ("include_dispreferred", "rat", "chat_template")


def trained_layout(model_dir: str | Path, include_dispreferred: bool | None = None) -> TemplateOptions:
    """The layout `model_dir` was trained with, without its token budget (evaluation drops no shots).

    A folder without a saved config (a base model) gets the default layout. `include_dispreferred`,
    when given, overrides the trained value.
    """
    path = Path(model_dir) / CONFIG_FILE
    override = {} if include_dispreferred is None else {"include_dispreferred": include_dispreferred}
    if not path.is_file():
        return TemplateOptions(**override)
    config = read_fields(path)
    missing = [name for name in LAYOUT_FIELDS if name not in config]
    if missing:
        raise UserError(f"config file {str(path)!r} lacks field(s) {', '.join(missing)}")
    try:
        fields = {k: config[k] for k in LAYOUT_FIELDS}
        if fields["rat"] == "description":
            # Trained on description pairs (targets without answers), from a RAT model: it answers
            # in RAT's layout, description then answer.
            fields["rat"] = "target"
        return TemplateOptions.of_training(**{**fields, **override})
    except ValueError as err:  # pydantic's ValidationError included: a bad value of a layout field
        raise UserError(f"invalid training config ({path}): {err}") from None
