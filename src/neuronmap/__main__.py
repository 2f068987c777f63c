"""The ``neuronmap`` command's entry point (also ``python -m neuronmap``).

It imports nothing heavy before it can catch Ctrl-C, so an interrupt at any
moment, start-up included, ends in one line and exit status 130, never a traceback.
"""

import sys


def main() -> int:
    try:
        from neuronmap.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was written\n")
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
