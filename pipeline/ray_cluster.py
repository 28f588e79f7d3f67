"""The Ray connection of every command: join the configured cluster or start a local one, with
the environment workers need, and check that the training workers can be placed."""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

from pipeline.config import Config
from pipeline.console import VERBOSE_ENV, quiet_env, verbose

TEST_HOOKS_ENV = "CYCLEGAN_FAULT_"
"""Variables with this prefix reach the workers: the test suite's fault injection."""


def worker_env(cfg: Config) -> dict[str, str]:
    """Variables every Ray worker needs: tracking and storage credentials (never logged)."""
    from pipeline.storage import storage_env
    from pipeline.tracking import tracking_env

    env = {**tracking_env(cfg), **storage_env()}
    env.update({k: v for k, v in os.environ.items() if k.startswith(TEST_HOOKS_ENV)})
    if os.environ.get(VERBOSE_ENV):
        env[VERBOSE_ENV] = os.environ[VERBOSE_ENV]
    env.update(quiet_env())
    return env


IDLE_WORKER_KEEP_MS = 60_000
"""How long a Ray cluster this project starts keeps an idle worker process. Ray's default
(1 s, once more workers run than the node has CPUs) ends the fractional-CPU decode workers
between passes, and every pass then pays seconds of Python imports for new ones (measured: a
pass over 1024 images ran at half speed). Set on `ray start` as the environment variable
``RAY_idle_worker_killing_time_threshold_ms``."""
WORKER_NICENESS = 0
"""The niceness of the Ray worker processes of a cluster this project starts. Ray's default
(15) lets every other process preempt a training worker at once, and a multi-threaded step
stalls at its next barrier whenever one of its threads is off the CPU: measured on 2 cores,
the bare demo step ran at 0.82 of its speed at niceness 15 with nothing else running. Set on
`ray start` as the environment variable ``RAY_worker_niceness``."""
RAY_SYSTEM_CONFIG = {
    "idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS,
    "worker_niceness": WORKER_NICENESS,
}
IDLE_CLASS_WORKER_KEEP_MS = 7 * 24 * 3600 * 1000
"""How long an idle worker process is kept where Ray's processes go to the idle CPU class
(``scaling.idle_helpers``): a week, i.e. the run's whole length. An idle-class worker that the
raylet ends while the step keeps both cores busy may crash on its way out (Ray's own threads,
starved mid-exit, trip its lock checks: seen as SIGABRT "Mutex corrupt" exactly 60 s after a
data worker went idle); kept, it costs a little memory and no CPU that the step would use."""


def system_config(cfg: Config) -> dict:
    """Ray's settings for a local Ray started for ``cfg``'s run."""
    if cfg.scaling.idle_helpers:
        return {
            **RAY_SYSTEM_CONFIG,
            "idle_worker_killing_time_threshold_ms": IDLE_CLASS_WORKER_KEEP_MS,
        }
    return RAY_SYSTEM_CONFIG


LOCAL = "local"
"""The address that always starts a private local Ray, even beside a running one."""


def recorded_cluster() -> str | None:
    """The address of the cluster ``ray start`` recorded on this machine, when its GCS still
    accepts connections; None when there is no record or the cluster behind it is gone (killed
    rather than stopped, it leaves the record behind)."""
    # Ray's own record and the folder it lives in ($RAY_TMPDIR, $TMPDIR, /tmp).
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        with open(os.path.join(tmp, "ray", "ray_current_cluster")) as f:
            address = f.read().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return None
    return address


_dashboard_url = ""


def dashboard_url() -> str:
    """The dashboard of the cluster :func:`connect` joined or started (http://host:port), or
    "" where it has none."""
    url = _dashboard_url
    return url if not url or "://" in url else f"http://{url}"


def import_in_background(modules: tuple[str, ...]) -> None:
    """Import ``modules`` in a thread while this one waits for Ray to start (seconds spent
    waiting on Ray's processes): the driver then finds them loaded."""
    if not modules:
        return

    def load() -> None:
        for name in modules:
            with contextlib.suppress(Exception):  # the main thread's own import will say why
                importlib.import_module(name)

    threading.Thread(target=load, name="import-ahead", daemon=True).start()


def connect(
    cfg: Config,
    cpus_beyond_cores: float = 0.0,
    address: str | None = None,
    import_ahead: tuple[str, ...] = (),
) -> bool:
    """Join ``address`` (default ``scaling.address``, else ``$RAY_ADDRESS``, else a cluster
    ``ray start`` runs on this machine), or start a private local Ray (address ``local``, or
    none found) with ``cpus_beyond_cores`` logical CPUs more than the machine has cores; True
    when started here.

    The extra logical CPUs let the training workers reserve theirs while Ray Data still gets
    one per core, so data tasks can always be scheduled next to the workers.
    ``import_ahead``: modules to load meanwhile (see :func:`import_in_background`)."""
    global _dashboard_url
    import ray

    if ray.is_initialized():
        return False
    import_in_background(import_ahead)
    env = worker_env(cfg)
    if address is None:
        address = cfg.scaling.address or os.environ.get("RAY_ADDRESS", "")
    if not address and (address := recorded_cluster() or ""):
        print(
            f"[ray] joining the Ray cluster already running on this machine at {address} "
            f"(--address {LOCAL} starts a private one instead)",
            flush=True,
        )
    if address and address != LOCAL:
        # Inside `ray job submit` the job's runtime env already holds some of these variables;
        # combine the two instead of failing on the overlap.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        context = ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        _dashboard_url = context.dashboard_url or ""
        return False
    context = ray.init(
        # "local": a new cluster, never one found through $RAY_ADDRESS or Ray's record.
        address=LOCAL,
        # Ray's "Started a local Ray instance" line: the run's header names the dashboard.
        logging_level=logging.INFO if verbose() else logging.WARNING,
        num_cpus=(os.cpu_count() or 1) + math.ceil(cpus_beyond_cores),
        # Kept although it costs a 2-core machine about 1.8 s before the first step: the run's
        # header links it (Ray Train's and Ray Data's views of the run, the workers' logs).
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env},
        _system_config=system_config(cfg),
    )
    _dashboard_url = context.dashboard_url or ""
    return True


CONTROLLER_POLL_S = "0.2"
"""How often Ray Train's controller polls its workers (Ray's default is 2 s). A worker's report
waits in a queue of one until the next poll, so at the default every report after the first
within 2 s stalls the step: a run that checkpoints every few seconds spent most of its time
there. A poll is one small actor call per worker."""


def train_controller_env(started_here: bool) -> Callable[[], None]:
    """Settings Ray Train's controller reads from the driver's environment (it passes them on
    to the controller and the workers); a value the user set is kept. Returns the function
    that puts the environment back (a later run in this process may join another Ray)."""
    wanted = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": CONTROLLER_POLL_S}
    if started_here:
        # A private single-node Ray is never drained: no preemption watcher actor to start.
        wanted["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    added = [name for name in wanted if name not in os.environ]
    os.environ.update({name: wanted[name] for name in added})

    def restore() -> None:
        for name in added:
            os.environ.pop(name, None)

    return restore


def _placement_problems(cfg: Config, use_gpu: bool) -> list[str]:
    import ray

    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 0)
    n, per = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    problems = []
    if use_gpu and n > gpus:
        problems.append(f"{n} workers need {n} GPUs, the cluster has {gpus:g}")
    if n * per > cpus:
        problems.append(f"{n} workers x {per:g} CPUs = {n * per:g} CPUs, the cluster has {cpus:g}")
    for name, amount in cfg.scaling.extra_resources().items():
        if n * amount > res.get(name, 0):
            problems.append(
                f"{n} workers x {amount:g} {name} (scaling.worker_resources) = {n * amount:g}, "
                f"the cluster has {res.get(name, 0):g}"
            )
    return problems


def _check_data_cpus(cfg: Config) -> None:
    """Refuse workers that would leave Ray Data's decode tasks no CPU: they could never be
    scheduled, and the run would wait forever without a word."""
    import ray

    from pipeline.reading import DECODE_CPUS

    cpus = ray.cluster_resources().get("CPU", 0)
    n, per = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    if cpus - n * per < DECODE_CPUS:
        fit = max(0.1, (cpus - DECODE_CPUS) / n)
        raise ValueError(
            f"scaling.cpus_per_worker: {n} workers x {per:g} CPUs leave {cpus - n * per:g} of "
            f"the cluster's {cpus:g} CPUs for decoding images, which needs {DECODE_CPUS:g}: set "
            f"scaling.cpus_per_worker={fit:.2g} or fewer workers, or add CPUs"
        )


def check_resources(cfg: Config, local: bool) -> bool:
    """Whether to use GPUs. Raises a clear error when the workers cannot all be placed: at once
    on a local Ray, after ``scaling.placement_timeout_s`` on a cluster (autoscalers add nodes)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = cfg.scaling.use_gpu if cfg.scaling.use_gpu is not None else gpus > 0
    deadline = time.monotonic() + (0 if local else cfg.scaling.placement_timeout_s)
    warned = False
    while problems := _placement_problems(cfg, use_gpu):
        message = "scaling.num_workers: cannot place the training workers: " + "; ".join(problems)
        if time.monotonic() >= deadline:
            raise ValueError(message)
        if not warned:
            # Ask the autoscaler (if any) for the workers' bundles; reading resources alone
            # creates no demand, so no node would ever be added.
            from ray.autoscaler.sdk import request_resources

            bundle = {
                "CPU": cfg.scaling.cpus_per_worker,
                **({"GPU": 1} if use_gpu else {}),
                **cfg.scaling.extra_resources(),
            }
            request_resources(bundles=[bundle] * cfg.scaling.num_workers)
            print(
                f"[train] {message}; waiting up to {cfg.scaling.placement_timeout_s:g}s "
                "for the cluster to grow",
                file=sys.stderr,
                flush=True,
            )
            warned = True
        time.sleep(min(5.0, cfg.scaling.placement_timeout_s))
    _check_data_cpus(cfg)
    return use_gpu
