"""What a run writes for later: the HF export and resume checkpoints (:mod:`coati.checkpoint.resume`).

Import from the submodule that defines a name; this package re-exports nothing.
"""
