"""The ``neuronmap`` command's entry point (also ``python -m neuronmap``).

It takes over Ctrl-C and SIGTERM before it imports anything heavy, so an
interrupt at any moment, start-up included, removes the temporary outputs and
ends in one line (exit 130 or 143), never a traceback.
"""

import os
import signal
import sys


def _early(signum, frame) -> None:
    # Until fsio's handler is in place (importing it takes a few ms): nothing can have been written yet.
    sys.stderr.write(f"{'terminated' if signum == signal.SIGTERM else 'interrupted'}: nothing was written\n")
    os._exit(128 + signum)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _early)
    from neuronmap.core.fsio import exit_on_signals

    exit_on_signals()
    from neuronmap.cli import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
