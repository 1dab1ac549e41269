"""Errors that end a training run with a one-line message (``segrl: Name: message``)."""


class TrainingError(RuntimeError):
    """A run that cannot go on: diverged training, bad prompts, an unusable run directory..."""
