"""What a run writes for later, one job per module.

- :mod:`coati.checkpoint.export`: the HF export, a standard ``*ForSequenceClassification`` folder anyone can load.
- :mod:`coati.checkpoint.resume`: resume checkpoints (layout, manifest, the locked save path, write and read).
- :mod:`coati.checkpoint.fingerprint`: what identifies a run, so a checkpoint never resumes another one.
- :mod:`coati.checkpoint.safe_load`: reading a checkpoint without unpickling code; ``CheckpointError``.

Import from the submodule that defines a name; this package re-exports nothing.
"""
