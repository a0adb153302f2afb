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
