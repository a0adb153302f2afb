"""`option`: the click option every `embedforge` command declares, spelled with dashes and with underscores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def option(name: str, dest: str | None = None, *, off: str | None = None, **kwargs: Any) -> Callable[[Any], Any]:
    """A click option accepting --some-name and --some_name (shown with its default unless show_default=False).

    name: the option in underscores ("train_path"); dest: the function parameter it fills (default: name);
    off: the name of a boolean flag's off switch ("no_pack_tokens" for --pack-tokens/--no-pack-tokens).
    """
    spellings = [lambda word: f"--{word.replace('_', '-')}", lambda word: f"--{word}"]
    if off is None:
        flags = [spell(name) for spell in spellings]
    else:
        flags = [f"{spell(name)}/{spell(off)}" for spell in spellings]
    kwargs.setdefault("show_default", True)
    return click.option(*dict.fromkeys(flags), dest or name, **kwargs)
