"""The ``dist-cautious train`` job: a small GPT-style model on Python's own standard library.

Small modules with one job each: ``corpus`` (the embedded text and its batches), ``model`` (the
byte-level GPT), ``optimizers`` (names -> configured optimizers), ``backend`` (rank discovery,
process groups, single / DDP / FSDP2 / DeepSpeed wrapping), ``loop`` (the training loop).
"""
