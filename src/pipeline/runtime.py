"""Where the pipeline runs: the cluster in RAY_ADDRESS, or a local Ray started in process."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import ray

from pipeline.errors import inner

log = logging.getLogger("pipeline")


def init_ray(num_cpus: int | None = None) -> None:
    """Connect once per process. With RAY_ADDRESS (or inside `ray job submit`) the cluster is used
    unchanged; otherwise a local Ray of this process's own starts here, with its dashboard off and
    nothing bound beyond loopback."""
    ctx = ray.data.DataContext.get_current()
    # Sorts and groupings run as plain tasks: the hash shuffle starts aggregator actors, which
    # costs seconds per shuffle on a small cluster, more than curate's shuffles themselves.
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        log.info("connected to Ray cluster at %s", os.environ["RAY_ADDRESS"])
    else:
        # Actors a cluster needs and a local Ray does not; each costs a process start per read or per
        # training run (the processes Ray starts inherit these). Ray Data reads the footers of a Parquet
        # listing on a pool of 32 actors, sized for thousands of files on object storage (on 2 CPUs: 6-9
        # -> 3.5 CPU-seconds per read of the tiny training set with one). Ray Train watches for nodes being
        # drained (preempted); one local node never is.
        cpus = num_cpus or os.cpu_count() or 2
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(max(1, cpus // 2)))
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # "local": without it, ray.init() joins any cluster `ray start` left on this machine (found
        # through /tmp/ray), so a run meant to be embedded would land on someone else's Ray
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            _system_config={"num_workers_soft_limit": workers_kept(cpus)},
        )
        log.info("started local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    ctx.enable_progress_bars = True


def state_api_answers() -> bool:
    """Whether the state API of the Ray this process is connected to answers: its dashboard serves it, and
    the local Ray runs none. Asked at that dashboard's address: without one, the state API looks for a Ray
    on this machine and fails when it finds two (a local run beside another)."""
    from ray._private.worker import get_dashboard_url
    from ray.util.state import list_nodes

    if not (url := get_dashboard_url()):
        return False
    try:
        list_nodes(address=url if "://" in url else f"http://{url}", limit=1, timeout=5, raise_on_missing_output=False)
    except Exception:  # whatever stops it answering would stop the one who asks too
        return False
    return True


def workers_kept(cpus: int) -> int:
    """How many worker processes the local Ray keeps before it ends idle ones. Ray's default is one per
    CPU, and it counts actors: a training run holds ten or so (its workers, controller, synchronization
    actor, dataset manager, split coordinators and Ray Data's two), so every run ended the idle task
    workers, and the next stage's tokenizing tasks started new processes that import transformers and
    load the tokenizer again, 6 s of a core each. The room for a run's actors keeps them; an idle worker
    holds memory (its imports), never CPUs."""
    return 2 * cpus + 16


def rows_per_batch(ds: ray.data.Dataset, target_bytes: int = 32 << 20) -> int:
    """Rows making about `target_bytes` per map task (for `map_batches(batch_size=...)`, which then
    bundles small blocks): each Ray Data task costs tens of milliseconds before it does any work.
    `ds` should be materialized, so its row count and size are known without running it."""
    return max(1, int(target_bytes * ds.count() / max(ds.size_bytes(), 1)))


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds `path` (or would: the nearest folder above it that exists)."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(error: BaseException | None) -> OSError | None:
    """The full-disk error behind `error`, however Ray wrapped it: a Ray Train worker's or controller's
    failure, a task's cause, a chained exception."""
    for _ in range(10):  # a wrapper's chain is short; the bound guards against a cycle
        if error is None or (isinstance(error, OSError) and error.errno == errno.ENOSPC):
            return error
        error = inner(error) or error.__cause__ or error.__context__
    return None


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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e) is not None:  # the bare error names no disk; Ray Data's wraps it in retry advice
            free = free_bytes(final.parent) / 2**20
            raise OSError(
                errno.ENOSPC,
                f"no space left on the disk of {final.parent} while writing {final.name} "
                f"({free:.1f} MiB free once the partial output was removed); nothing of it was kept",
            ) from e
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
