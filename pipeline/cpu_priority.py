"""On a Ray that a run starts for itself, Ray's own processes yield the CPU to the training
workers: every few seconds they are put in Linux's idle scheduling class (``SCHED_IDLE``)
(``scaling.idle_helpers``, off by default). Nothing on such a Ray waits on a deadline for its
services: the one that did, Ray Train's placement-group cleaner, is not started there (see
``training.trainer_class``).

Why: a private Ray on a small machine runs 20-30 processes beside the training worker (its
services, the dashboard, Ray Train's and Ray Data's helper actors, pooled workers), and each of
them wakes a hundred or more times a second. At normal priority every wake-up preempts one of
the step's threads at once, and the step's other thread then waits for it at its next barrier:
measured on 2 cores at 32 px, the training worker's two step threads were preempted about 1000
times a second each (30 in a plain process), and an idle Ray of 24 processes alone slowed the
bare step by 10-15%. Niceness 19 does not help (a woken task still preempts); SCHED_BATCH did
not either. A ``SCHED_IDLE`` thread never preempts a normal one and runs whenever a core is
free, which on a training machine is whenever the step waits: data tasks still decode, and the
cluster's heartbeats still answer.

What stays at normal priority: the training workers (Ray Train's ``RayTrainWorker`` actors),
and the raylet, which starts every new worker process (a process inherits its parent's class:
born idle, a new worker's seconds of imports wait behind the step, and Ray starts yet more
workers meanwhile). Where the user may leave the idle class again (root, RLIMIT_NICE), the
driver's threads but its main one go idle too, and get their class back after the run.
Nothing is touched before all the training workers run, since Ray may start one in a pooled
worker process; a raylet ending an idle-class worker mid-run can crash it on its way out, so
such a Ray keeps its idle workers (``ray_cluster.IDLE_CLASS_WORKER_KEEP_MS``). A training worker
restarted after a failure into a pooled process made idle meanwhile asks for the normal class
back; where Linux refuses (an unprivileged user without RLIMIT_NICE), it says so and trains at
idle priority beside idle neighbours.

Only the descendants of the process that started Ray are touched: never a cluster the user
runs, never another process of the user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
from collections.abc import Iterator

import psutil  # Ray's own dependency

log = logging.getLogger(__name__)

KEEP_NORMAL = ("ray::RayTrainWorker", "raylet")
"""Processes left at normal priority: their process title (Ray's ``ray::CLASS`` titles) or the
name of their program starts with one of these."""

SWEEP_S = 2.0
"""Seconds between two passes over the processes (new pooled workers appear during a run)."""

SUPPORTED = hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE")


def descendants(root: int, prune=lambda pid: False) -> list[int]:
    """Every living descendant of process ``root`` (children, their children, ...), without
    the descendants of a process for which ``prune`` is true."""
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        if proc.info["ppid"] is not None:
            children.setdefault(proc.info["ppid"], []).append(proc.pid)
    found, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        found.append(pid)
        if not prune(pid):
            todo.extend(children.get(pid, ()))
    return found


def _title(pid: int) -> str:
    """Ray's process title (``ray::CLASS``), or the name of the process's program."""
    try:
        first = next(iter(psutil.Process(pid).cmdline()), "")
    except psutil.Error:
        return ""
    return first.rsplit("/", 1)[-1] if first.startswith("/") else first


def keeps_normal(pid: int) -> bool:
    return _title(pid).startswith(KEEP_NORMAL)


def _training(pid: int) -> bool:
    return _title(pid).startswith(KEEP_NORMAL[0])


def make_idle(pid: int) -> int:
    """Put every thread of ``pid`` in the idle class; returns how many threads changed."""
    changed = 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in map(int, threads):
        # A thread may end, or the process exit, between the listing and the call.
        with contextlib.suppress(OSError):
            if os.sched_getscheduler(tid) != os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                changed += 1
    return changed


def sweep(root: int, workers: int = 1) -> int:
    """One pass: the descendants of ``root`` that do not keep normal priority go idle; the
    processes a training worker starts itself (e.g. ``torch.compile``'s) are left alone.

    Nothing changes before ``workers`` training workers run: Ray may start a training worker
    in a pooled worker process it started earlier, and that one must not have been made idle."""
    found = descendants(root, prune=_training)
    if sum(map(_training, found)) < workers:
        return 0
    return sum(make_idle(pid) for pid in found if not keeps_normal(pid))


def can_leave_idle() -> bool:
    """Whether this user may move a thread out of the idle class again (root, or an
    RLIMIT_NICE that allows nice 0): then the driver's threads go idle too."""
    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


def _own_threads_idle() -> list[int]:
    """This process's threads but the main one go idle; returns those changed."""
    main, changed = threading.main_thread().native_id, []
    for tid in map(int, os.listdir("/proc/self/task")):
        with contextlib.suppress(OSError):
            if tid != main and os.sched_getscheduler(tid) != os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                changed.append(tid)
    return changed


@contextlib.contextmanager
def helpers_idle(enabled: bool = True, workers: int = 1, root: int | None = None) -> Iterator[None]:
    """While the block runs, sweep the descendants of ``root`` (default this process) every
    ``SWEEP_S`` seconds in a background thread (itself at idle priority), once ``workers``
    training workers run."""
    if not (enabled and SUPPORTED):
        yield
        return
    root = os.getpid() if root is None else root
    full = can_leave_idle()
    stop = threading.Event()
    own: set[int] = set()

    def loop() -> None:
        with contextlib.suppress(OSError):  # tid 0: this thread only
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        while True:
            try:
                if sweep(root, workers) and full and root == os.getpid():
                    own.update(_own_threads_idle())
            except Exception:  # never let a pass end the run
                log.debug("cpu priority sweep failed", exc_info=True)
            if stop.wait(SWEEP_S):
                return

    thread = threading.Thread(target=loop, name="ray-helpers-idle", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        for tid in own:  # the caller's threads (its own, perhaps) get their class back
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


def ensure_normal() -> bool:
    """In a training worker: leave the idle class if this process was put there (a pooled
    worker reused for a restarted training worker). False, with a warning, where Linux refuses."""
    if not SUPPORTED or os.sched_getscheduler(0) != os.SCHED_IDLE:
        return True
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError as exc:
        log.warning(
            "this training worker runs at idle CPU priority (a pooled Ray worker made idle "
            "earlier; leaving the idle class was refused: %s); set scaling.idle_helpers=false "
            "to keep Ray's processes at normal priority",
            exc,
        )
        return False
    return True
