"""Stage 8, removal: TARS concept removal by weight edits.

Owns the method on a loaded model, writing nothing (method), and the edited checkpoint on disk with its report and
``undo`` (edited; ``neuronmap.remove``).

May import: every stage below (core .. intervene).
"""
