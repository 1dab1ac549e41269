"""segrl: segment-level reinforcement learning for language models on reasoning tasks."""

__version__ = "0.1.0"
