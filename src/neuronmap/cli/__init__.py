"""The ``neuronmap`` command: each subcommand parses, calls the Python API, prints.

Every command that outputs data takes ``--json``; the default is a Rich table.
Bad input prints ``error: <one line>`` to stderr and exits 2.

Stage 11, cli: the top; each command parses, calls one API function, renders (doc: docs/cli.md from the parser).
May import: every stage.
"""

from __future__ import annotations

import argparse
import sys

from neuronmap.cli.atlas_cmds import add_map, add_search, add_show, add_stats
from neuronmap.cli.browse_cmds import add_layer, add_serve, add_similar
from neuronmap.cli.common import err
from neuronmap.cli.compare_cmd import add_compare
from neuronmap.cli.evidence_cmds import add_examples, add_record
from neuronmap.cli.flags import as_flags
from neuronmap.cli.model_cmds import add_clamp, add_generate, add_verify
from neuronmap.cli.remove_cmd import add_remove
from neuronmap.cli.series_cmds import add_map_many, add_trajectory
from neuronmap.cli.trace_cmd import add_trace
from neuronmap.core.errors import NeuronmapError
from neuronmap.atlas.damage import damaged_data
from neuronmap.core.fsio import exit_on_signals, restore_signals

COMMANDS = [add_map, add_search, add_show, add_layer, add_similar, add_stats, add_clamp, add_generate, add_verify, add_trace, add_compare,
            add_map_many, add_trajectory, add_remove, add_record, add_examples, add_serve]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what>; see `neuronmap CMD --help```, exit 2, no usage block."""

    def error(self, message: str):
        raise NeuronmapError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    from neuronmap.core.version import VERSION as __version__

    parser = _Parser(prog="neuronmap", description="Decode MLP neurons with the model's own LM head.")
    parser.add_argument("--version", action="version", version=f"neuronmap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input and interrupts end in one line on stderr, never a traceback.

    Returns:
        0 on success, 2 on bad input; Ctrl-C and SIGTERM exit at once with 130 and 143 (``fsio.exit_on_signals``).
    """
    previous = exit_on_signals()
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except NeuronmapError as e:
        err.print(f"error: {as_flags(str(e))}", markup=False)  # the library names parameters, the CLI its flags
        return 2
    except KeyboardInterrupt:  # signals left to the host (not the main thread)
        err.print("interrupted: nothing was written", markup=False)
        return 130
    except Exception as e:
        damaged = damaged_data(e)
        if damaged is None:
            raise
        err.print(f"error: {as_flags(damaged)}", markup=False)
        return 2
    finally:
        restore_signals(previous)


if __name__ == "__main__":
    sys.exit(main())
