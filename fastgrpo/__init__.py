"""fastgrpo: a GRPO trainer built on the fastgrpo_kernels package."""

__version__ = "0.1.0"
