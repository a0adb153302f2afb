"""The `embedforge` command: a click group whose subcommands are imported only when run.

Lazy loading keeps `embedforge serve` free of torch and quick to start: the serving side never
imports the training modules. `main` sets the environment the commands need before any of them is
imported: HF_HUB_OFFLINE=1 (models load from local directories; nothing waits on an unreachable hub).
"""

from __future__ import annotations

import importlib
import os

import click

COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("embedforge.train.cli", "train_command", "Fine-tune an encoder on query-document pairs."),
    "evaluate": ("embedforge.evaluate.cli", "evaluate_command", "Score checkpoints; pick the best one."),
    "export": ("embedforge.export.cli", "export_command", "Export a checkpoint to optimized ONNX."),
    "serve": ("embedforge.server.cli", "serve_command", "Serve an ONNX export over gRPC (and HTTP, --http-port)."),
    "embed": ("embedforge.server.cli", "embed_command", "Embed texts with a running server."),
    "embed-corpus": ("embedforge.corpus.command", "embed_corpus_command",
                     "Embed a corpus into Parquet shards (one machine or Ray)."),
    "check-space": ("embedforge.corpus.command", "check_space_command",
                    "Exit 0 when a corpus and a server share one embedding space."),
    "health": ("embedforge.server.cli", "health_command", "Exit 0 when a server's gRPC health is SERVING."),
    "loadtest": ("embedforge.loadtest.command", "loadtest_command", "Load-test a running server."),
}


class LazyGroup(click.Group):
    """A group that imports each subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, _, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="embedforge")
def cli() -> None:
    """Fine-tune, evaluate, export and serve text-embedding models."""


def main() -> None:
    """The `embedforge` entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()
