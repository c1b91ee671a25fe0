"""Integrations with training frameworks (DeepSpeed config names, checkpoint conversion)."""
