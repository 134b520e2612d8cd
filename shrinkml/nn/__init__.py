"""Custom PyTorch modules and module surgery (the torch side of techniques).

Technique modules import these lazily, inside the functions that run a step, so that validating a
recipe or listing techniques never imports torch. This package's ``__init__`` imports nothing.
"""
