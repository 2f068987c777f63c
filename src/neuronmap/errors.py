"""The one exception type users see: a one-line message naming what is wrong and the fix."""


class NeuronmapError(Exception):
    """Bad input or state. The CLI prints ``error: <message>`` and exits 2, with no traceback."""
