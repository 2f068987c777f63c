"""The one exception type users see: a one-line message naming what is wrong and the fix."""


class NeuronmapError(Exception):
    """Bad input or state. The CLI prints ``error: <message>`` and exits 2, with no traceback."""


class ResumableError(NeuronmapError):
    """A failure of the machinery, not of the input (a Ray cluster that lost workers): a map keeps its finished parts."""


