"""Training: SFT warm start, the single-machine DC-GRPO loop, checkpoints."""
