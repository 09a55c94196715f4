"""Errors the CLI reports as one clear line (exit code 2) instead of a traceback."""


class QualityGateError(RuntimeError):
    """The 4-bit model lost more than the configured perplexity budget: it is not deployed."""


class CheckpointDamagedError(RuntimeError):
    """No checkpoint of the run is whole: resuming would train on garbage, and --fresh loses nothing more."""


def inner(error: BaseException) -> BaseException | None:
    """What a Ray wrapper holds: a Ray Train worker group's first failure, its controller's, or a Ray
    task's cause; None for an error that wraps nothing."""
    failures = getattr(error, "worker_failures", None)  # by rank
    if failures:
        return next(iter(failures.values()))
    return getattr(error, "controller_failure", None) or getattr(error, "cause", None)
