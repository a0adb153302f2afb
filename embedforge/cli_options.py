"""`option`: the click option every `embedforge` command declares, spelled with dashes and with underscores;
`client_tls_options`: the TLS options of every command that calls a server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def option(name: str, dest: str | None = None, *, off: str | None = None, **kwargs: Any) -> Callable[[Any], Any]:
    """A click option accepting --some-name and --some_name (shown with its default unless show_default=False).

    name: the option in underscores ("train_path"); dest: the function parameter it fills (default: name);
    off: the name of a boolean flag's off switch ("no_pack_tokens" for --pack-tokens/--no-pack-tokens).
    """
    on_flags = _spellings(name)
    if off is None:
        flags = on_flags
    else:  # click pairs "on/off"; " /off" adds an off spelling alone (a one-word name has one on spelling)
        off_flags = _spellings(off)
        flags = [f"{on_flags[i] if i < len(on_flags) else ' '}/{flag}" for i, flag in enumerate(off_flags)]
    kwargs.setdefault("show_default", True)
    return click.option(*flags, dest or name, **kwargs)


def _spellings(word: str) -> list[str]:
    """--some-name and --some_name (one spelling for a word without underscores)."""
    return list(dict.fromkeys((f"--{word.replace('_', '-')}", f"--{word}")))


def client_tls_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--tls-root-cert, --tls-cert and --tls-key, for the commands that call a server; each may also come from
    an environment variable (EMBEDFORGE_TLS_ROOT_CERT, ...), so that a container's HEALTHCHECK finds them."""
    pem = click.Path(path_type=Path, dir_okay=False, exists=True)
    for declare in reversed((
        option("tls_root_cert", type=pem, default=None, envvar="EMBEDFORGE_TLS_ROOT_CERT", show_envvar=True,
               help="PEM root certificate that signed the server's: connect with TLS."),
        option("tls_cert", type=pem, default=None, envvar="EMBEDFORGE_TLS_CERT", show_envvar=True,
               help="PEM client certificate, for a server that requires one (mutual TLS); with --tls-key."),
        option("tls_key", type=pem, default=None, envvar="EMBEDFORGE_TLS_KEY", show_envvar=True,
               help="PEM private key of --tls-cert."),
    )):
        command = declare(command)
    return command


ALLOW_INSECURE_KEY_HELP = "Send the API key without TLS to a non-loopback address (anyone on the path can read it)."
