"""DeepSpeed's C++ ops that torch compiles on first use, loaded so that a worker killed while loading one
cannot stall every later run on the machine.

torch marks a JIT build (or the check that nothing needs building) with a `lock` file in the op's build
folder, which only the process that made it removes; every other loader waits for it to go, with no
timeout and no message. A worker killed in that window (preempted, OOM-killed, SIGKILLed by a fault
drill) leaves the file behind, and from then on every DeepSpeed start on the machine hangs. DeepSpeed on
CPU loads its shared-memory all-reduce op this way in every process of every run, so the window opens on
each start; a user's DeepSpeed JSON can add more (the CPU Adam of an offloaded optimizer without
torch_adam, say). In our workers every such load is made one process of the machine at a time, after
removing a lock that no living process holds.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("pipeline.train")


def guard_op_loads() -> None:
    """From here on in this process, each DeepSpeed op torch loads is loaded alone among this machine's
    processes, after a dead loader's lock is removed. DeepSpeed loads its ops deep inside
    `deepspeed.initialize` and its optimizers, and every one passes through `OpBuilder.jit_load` (no builder
    overrides it), so that is where the guard goes. It stays for the process: a Ray Train worker lives for
    one run."""
    from deepspeed.ops.op_builder.builder import OpBuilder
    from torch.utils.cpp_extension import _get_build_directory

    if getattr(OpBuilder.jit_load, "guarded", False):
        return
    plain = OpBuilder.jit_load

    @functools.wraps(plain)
    def jit_load(builder, verbose=True):
        folder = Path(_get_build_directory(builder.name, verbose=False))
        with one_process_at_a_time(folder / "pipeline-load.flock"):
            if remove_dead_lock(folder / "lock"):
                log.warning(
                    "removed %s: a process died while loading DeepSpeed's %s op and left it, and every later "
                    "DeepSpeed start would have waited on it forever",
                    folder / "lock",
                    builder.name,
                )
            return plain(builder, verbose)

    jit_load.guarded = True
    OpBuilder.jit_load = jit_load


@contextmanager
def one_process_at_a_time(path: Path):
    """An exclusive flock on `path`: the kernel releases it when its holder dies, which torch's lock file
    cannot do, so no process of ours is ever inside a load while another looks at the lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def remove_dead_lock(lock: Path) -> bool:
    """Remove torch's build lock if no living process of this machine holds it open (the loader that
    made it keeps it open until it removes it). Where that cannot be told (no /proc), the lock stays."""
    if not lock.exists() or not Path("/proc/self/fd").is_dir() or held_open(lock):
        return False
    lock.unlink(missing_ok=True)
    return True


def held_open(path: Path) -> bool:
    """Whether any process this user can see has `path` open."""
    target = os.path.realpath(path)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # ended meanwhile, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
            except OSError:
                continue
    return False
