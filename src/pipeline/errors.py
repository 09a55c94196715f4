"""Errors the CLI reports as one clear line (exit code 2) instead of a traceback."""


class QualityGateError(RuntimeError):
    """The 4-bit model lost more than the configured perplexity budget: it is not deployed."""


class CheckpointDamagedError(RuntimeError):
    """No checkpoint of the run is whole: resuming would train on garbage, and --fresh loses nothing more."""
