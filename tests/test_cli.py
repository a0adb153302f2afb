"""Every `embedforge` command accepts each dashed option in its underscore spelling too (README promise)."""

from __future__ import annotations

import click
import pytest

from embedforge.cli import COMMANDS, cli


def command(name: str) -> click.Command:
    ctx = click.Context(cli)
    found = cli.get_command(ctx, name)
    assert found is not None, name
    return found


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_dashed_option_has_its_underscore_spelling(name):
    options = [param for param in command(name).params if isinstance(param, click.Option)]
    assert options, name
    missing = []
    for option in options:
        flags = option.opts + option.secondary_opts
        missing += [flag for flag in flags if flag.startswith("--") and "-" in flag[2:]
                    and f"--{flag[2:].replace('-', '_')}" not in flags]
    assert not missing, f"embedforge {name}: no underscore spelling for {missing}"


def test_underscore_spellings_parse_to_the_same_values():
    serve = command("serve")
    args = ["--model_dir", "export", "--max_batch_tokens", "4096", "--min-batch-tokens", "64", "--grace_s", "2.5",
            "--log_level", "debug"]
    params = serve.make_context("serve", args).params
    assert (params["max_batch_tokens"], params["min_batch_tokens"], params["grace_s"]) == (4096, 64, 2.5)
    assert str(params["model_dir"]) == "export" and params["log_level"] == "debug"
    loadtest = command("loadtest")
    params = loadtest.make_context("loadtest", ["--target", "h:1", "--deadline_ms", "250", "--wait_ready", "1"]).params
    assert (params["deadline_ms"], params["wait_ready"]) == (250.0, 1.0)
    train = command("train")
    params = train.make_context("train", ["--no_pack_tokens", "--torch_dropout", "--batch_size", "8"]).params
    assert (params["pack_tokens"], params["fast_cpu_dropout"], params["batch_size"]) == (False, False, 8)
    with pytest.raises(click.NoSuchOption):
        serve.make_context("serve", ["--max__batch_tokens", "1"])


def test_a_one_word_switch_is_declared_once_with_both_off_spellings():
    from click.testing import CliRunner

    from embedforge.cli_options import option

    @click.command()
    @option("progress", off="no_progress", default=True)
    def command(progress: bool) -> None:
        click.echo(f"progress={progress}")

    opt = next(param for param in command.params if param.name == "progress")
    assert opt.opts == ["--progress"] and opt.secondary_opts == ["--no-progress", "--no_progress"]
    assert CliRunner().invoke(command, ["--no_progress"]).output == "progress=False\n"
    assert CliRunner().invoke(command, ["--no-progress"]).output == "progress=False\n"
    assert CliRunner().invoke(command, []).output == "progress=True\n"
