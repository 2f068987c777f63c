"""What every command shares: the two consoles, JSON output, argparse types, token and table rendering."""

from __future__ import annotations

import argparse
import json
import math
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from neuronmap.core.ids import shown

# emoji=False: Rich would print ":dog:" in a user's concept, path or id as an emoji, so a message would show something
# other than what was typed. Markup stays on for our own [bold]; user text goes through escape() or markup=False.
CONSOLE = {"highlight": False, "soft_wrap": True, "emoji": False}
out = Console(**CONSOLE)
err = Console(stderr=True, **CONSOLE)


def int_at_least(lo: int):
    """An argparse type: an integer >= ``lo``, refused at parse time (before any model loads)."""
    def parse(text: str) -> int:
        try:
            # int() also reads other scripts' digits ("٥" is 5): accept ASCII only, as ids do.
            if not text.isascii():
                raise ValueError(text)
            value = int(text)
        except ValueError as e:
            if text.strip().lstrip("+-").isascii() and text.strip().lstrip("+-").isdigit():  # past int()'s 4300 digits
                raise argparse.ArgumentTypeError(f"{shown(text)} is out of range: expected a whole number >= {lo}") from e
            raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer: expected a whole number >= {lo}") from e
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected a whole number >= {lo}")
        return value
    return parse


def finite_float(lo: float | None = None, hi: float | None = None):
    """An argparse type: a finite number within ``[lo, hi]`` (nan and inf are refused, never run as something else)."""
    want = "a number" + (f" from {lo:g} to {hi:g}" if lo is not None and hi is not None else f" >= {lo:g}" if lo is not None else "")

    def parse(text: str) -> float:
        try:
            if not text.isascii():
                raise ValueError(text)
            value = float(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: expected {want}") from e
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {want}")
        return value
    return parse


def print_json(data: dict) -> None:
    # allow_nan=False: a nan or inf that reached here is a bug in a to_dict(), not something to print as invalid JSON.
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def show_token(t: str) -> str:
    """A token as Python writes it, so leading spaces and newlines show; escaped for Rich markup ('[' is a token too)."""
    return escape(repr(t))


def print_table(tab: Table) -> None:
    # Piped or redirected output has no width; Rich would squeeze the table into 80 columns.
    (out if out.is_terminal else Console(**CONSOLE, width=max(out.width, 200))).print(tab)


# --device and --dtype mean one thing in every command (runtime.models: DEVICE, DTYPE, model_dtype).
DEVICE_HELP = "auto | cpu | cuda (default auto: cuda where torch has one, else cpu)"
MODEL_DTYPE_HELP = "auto | float32 | bfloat16 (default auto: float32, exact; split is a decoding precision, map's)"
