"""Baselines that need more than a PEFT config: their Trainer hooks and loss terms."""
