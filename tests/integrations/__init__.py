"""Tests of the ways users reach the optimizers: names, Hugging Face Trainer / accelerate, torch.compile, DeepSpeed checkpoints."""
