"""Where the pipeline runs: the cluster in RAY_ADDRESS, or a local Ray started in process."""
from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import ray

log = logging.getLogger("pipeline")


def init_ray(num_cpus: int | None = None) -> None:
    """Connect once per process. With RAY_ADDRESS (or inside `ray job submit`) the cluster is used
    unchanged; otherwise a local Ray starts here, with its dashboard off and nothing bound beyond
    loopback."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        log.info("connected to Ray cluster at %s", os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        log.info("started local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    ray.data.DataContext.get_current().enable_progress_bars = True


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling directory that replaces `final` only when the block succeeds,
    so a crash never leaves a half-written output that looks complete."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
