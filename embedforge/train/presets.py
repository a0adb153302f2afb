"""`embedforge train --preset`: named sets of loss options, chosen on validation data (docs/training.md).

A preset fixes every loss option; options given explicitly on the command line (or to `preset_config`)
override it. The run's train_config.json records the preset's name beside the options it ran with.
"""

from __future__ import annotations

from typing import Any

from embedforge.train.config import TrainConfig, TrainError
from embedforge.train.losses import uses_in_batch

LOSS_OPTIONS = ("loss", "in_batch_weight", "scale", "positive_threshold", "negative_threshold", "rel_power",
                "symmetric", "false_negative_margin")

PRESETS: dict[str, dict[str, Any]] = {
    # cosine fitted to rel: calibrated scores, the best Spearman; ranking across queries not trained
    "similarity": {"loss": "weighted-mse", "in_batch_weight": 1.0, "scale": 20.0, "positive_threshold": 0.5,
                   "negative_threshold": 0.2, "rel_power": 0.0, "symmetric": False, "false_negative_margin": None},
    # the recommendation for graded data: MSE keeps the scores calibrated, a light in-batch term teaches ranking
    # (every related pair a positive weighing rel^2, labelled unrelated documents as hard negatives), and
    # documents the model already scores above a query's positive are not pushed away (false negatives)
    "balanced": {"loss": "weighted-mse+in-batch", "in_batch_weight": 0.1, "scale": 20.0, "positive_threshold": 0.25,
                 "negative_threshold": 0.2, "rel_power": 2.0, "symmetric": True, "false_negative_margin": 0.0},
    # ranking only (InfoNCE, both directions, hard negatives, false negatives left out): scores not calibrated
    "retrieval": {"loss": "in-batch", "in_batch_weight": 1.0, "scale": 20.0, "positive_threshold": 0.5,
                  "negative_threshold": 0.2, "rel_power": 0.0, "symmetric": True, "false_negative_margin": 0.0},
}


def describe(name: str) -> str:
    """The preset as command-line options ('--loss weighted-mse+in-batch --in-batch-weight 0.1 ...'); the in-batch
    options only where the loss uses them."""
    options = PRESETS[name]
    if not uses_in_batch(options["loss"]):
        options = {"loss": options["loss"]}
    flags = []
    for option, value in options.items():
        flag = "--" + option.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not None and value is not False:
            flags.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(flags)


def preset_config(preset: str | None, **options: Any) -> TrainConfig:
    """A TrainConfig from the preset's loss options, then `options` (explicit choices win), preset recorded."""
    if preset is None:
        return TrainConfig(**options)
    if preset not in PRESETS:
        raise TrainError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[preset], **options, "preset": preset})
