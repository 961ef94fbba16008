"""rft: reinforcement fine-tuning for language models (GRPO, DAPO, GSPO)."""

__version__ = "0.1.0"
