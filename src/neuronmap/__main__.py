"""The ``neuronmap`` command's entry point (also ``python -m neuronmap``).

It takes over Ctrl-C and SIGTERM before it imports anything heavy, so an
interrupt at any moment, start-up included, removes the temporary outputs and
ends in one line (exit 130 or 143), never a traceback.
"""

import sys

from neuronmap.fsio import exit_on_signals


def main() -> int:
    exit_on_signals()
    from neuronmap.cli import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
