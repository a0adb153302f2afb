"""One home per default: every command-line option that mirrors a config field takes that field's default."""

from __future__ import annotations

import dataclasses

import click
import pytest

from embedforge.corpus.command import embed_corpus_command
from embedforge.corpus.job import CorpusJob
from embedforge.server.cli import serve_command
from embedforge.server.config import ServeConfig
from embedforge.train.cli import train_command
from embedforge.train.config import TrainConfig

# (command, its config class, options whose default deliberately differs, with the reason)
COMMANDS = [
    (serve_command, ServeConfig, {"api_key_env": "None tells that no variable was named: then the key is optional"}),
    (train_command, TrainConfig, {}),
    (embed_corpus_command, CorpusJob, {}),
]


def field_defaults(config: type) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize(("command", "config", "exceptions"), COMMANDS, ids=lambda v: getattr(v, "name", ""))
def test_every_option_default_is_its_config_fields(command: click.Command, config: type, exceptions: dict):
    defaults = field_defaults(config)
    mirrored = [p for p in command.params if isinstance(p, click.Option) and p.name in defaults]
    assert len(mirrored) >= 5, f"{command.name}: only {len(mirrored)} options mirror {config.__name__}"
    context = click.Context(command)
    differ = {p.name: (p.get_default(context), defaults[p.name]) for p in mirrored
              if p.name not in exceptions and p.get_default(context) != defaults[p.name]}
    assert not differ, f"{command.name}: option default != {config.__name__} field default: {differ}"


@pytest.mark.parametrize("function", ["build_loss", "InBatchLoss", "TokenizedPairs", "CorpusEmbedder"])
def test_inner_defaults_are_the_config_fields(function: str):
    """Library entry points that take a config field as a keyword default to that field's value."""
    import inspect

    from embedforge.corpus.vectors import CorpusEmbedder
    from embedforge.train.losses import InBatchLoss, build_loss
    from embedforge.train.pairs import TokenizedPairs

    target, config = {"build_loss": (build_loss, TrainConfig), "InBatchLoss": (InBatchLoss, TrainConfig),
                      "TokenizedPairs": (TokenizedPairs, TrainConfig),
                      "CorpusEmbedder": (CorpusEmbedder, CorpusJob)}[function]
    defaults = field_defaults(config)
    by_design = {"negative_threshold"}  # TokenizedPairs: None = no hard negatives (the trainer passes the field)
    parameters = inspect.signature(target).parameters.values()
    shared = {p.name: (p.default, defaults[p.name]) for p in parameters
              if p.name in defaults and p.name not in by_design and p.default is not inspect.Parameter.empty}
    assert shared, f"{function} shares no defaulted keyword with {config.__name__}"
    assert all(ours == theirs for ours, theirs in shared.values()), shared
