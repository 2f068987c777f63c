"""Test support, not part of the pipeline: a synthetic atlas of any shape (synthetic) and a short real fine-tune of the
demo model (finetune), used by tests/ and bench/ only. Nothing in the pipeline imports it.

May import: any stage.
"""
