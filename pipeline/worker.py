"""The loop every Ray Train worker (or PBT trial) runs: build, restore, wrap for DDP, then
step, log, sample, evaluate and checkpoint until the planned step.

Read ``train_loop`` first: it is the whole loop as a screen of named steps.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import ray.train.torch
import ray.tune
import torch

from cyclegan.checkpoint import make_checkpoint, restore_checkpoint
from cyclegan.schedules import build_scheduler, set_base_lr
from cyclegan.train_step import (
    CycleGANNets,
    Optimizers,
    Pools,
    build_nets,
    build_optimizers,
    build_pools,
    train_step,
    translate_cycle,
)
from cyclegan.transforms import image_grid, to_input
from pipeline import checkpoints, console, cpu_priority, storage
from pipeline.allocator import keep_freed_memory
from pipeline.config import Config
from pipeline.data import UnpairedBatches, load_samples
from pipeline.images import label_rows
from pipeline.plan import RunPlan
from pipeline.tracking import MlflowSink, NullSink

FAULT_HOOKS_ENV = "CYCLEGAN_FAULT_HOOKS"
"""Path of a Python file whose ``before_step(step, rank, real_A)`` the loop calls: the test
suite's fault injection. Unset in every real run."""


class NonFiniteLoss(RuntimeError):
    pass


def say(message: str) -> None:
    """One progress line on stdout. Written directly: Ray Train patches ``print`` in workers
    to go through its logger, which shows every line twice on the driver."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 where it was chosen, or on 'auto' where the hardware runs it fast."""
    if cfg.train.precision == "bf16":
        return torch.bfloat16
    if cfg.train.precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    planned = cfg.optim.total_epochs * steps_per_epoch
    return min(planned, cfg.train.max_steps) if cfg.train.max_steps else planned


# where the loop runs: a Ray Train worker group, or one Tune trial process (PBT)


class TrainRuntime:
    """The loop inside a TorchTrainer: DDP ranks, dataset shards and reports of Ray Train."""

    checkpoint_class = ray.train.Checkpoint

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def shard(self, domain: str):
        return ray.train.get_dataset_shard(domain)

    def report(self, metrics: dict, checkpoint: ray.train.Checkpoint | None) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneRuntime:
    """The loop as a plain Tune function trainable (one process): Tune sees its checkpoints,
    which population-based training needs to copy a good trial into a weak one."""

    checkpoint_class = ray.tune.Checkpoint

    def __init__(self, datasets: dict) -> None:
        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.datasets = datasets

    def checkpoint(self) -> ray.tune.Checkpoint | None:
        return ray.tune.get_checkpoint()

    def shard(self, domain: str):
        return self.datasets[domain].iterator()

    def report(self, metrics: dict, checkpoint: ray.tune.Checkpoint | None) -> None:
        ray.tune.report(metrics, checkpoint=checkpoint)


# the training state and the steps of the loop


@dataclass
class TrainState:
    nets: CycleGANNets
    opts: Optimizers
    scheds: dict
    pools: Pools
    step: int = 0
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    """The losses stored with the checkpoint this state was restored from."""


def build_state(cfg: Config, rank: int, device: torch.device) -> TrainState:
    """Fresh nets (identical on every rank), optimizers, schedules and pools (seeded by rank)."""
    torch.manual_seed(cfg.train.seed)
    nets = build_nets(cfg.model)
    for _, net in nets.items():
        net.to(device)
    opts = build_optimizers(nets, cfg.optim, fused=device.type == "cuda" or None)
    scheds = {"G": build_scheduler(opts.G, cfg.optim), "D": build_scheduler(opts.D, cfg.optim)}
    pools = build_pools(cfg.loss.pool_size, cfg.train.seed * 1000 + 2 * rank)
    return TrainState(nets, opts, scheds, pools)


def find_checkpoint(runtime, plan: RunPlan, device: torch.device) -> tuple[str, dict] | None:
    """The newest loadable checkpoint of the run, as (path, state), if it has one.

    Ray Train records a checkpoint some time after a worker wrote it, and a worker or driver
    killed in between leaves a whole, verified checkpoint that Ray does not hand over: so a
    training run searches its own folder. A Tune trial takes the checkpoint Tune hands it
    (population-based training copies another trial's)."""
    latest = runtime.checkpoint()
    if isinstance(runtime, TrainRuntime):
        fs, run_dir = storage.resolve(plan.run_uri)
        first = None
        if latest is None and not checkpoints.checkpoint_folders(fs, run_dir, plan.run_uri):
            return None
    elif latest is not None:
        fs, run_dir, first = (
            latest.filesystem,
            os.path.dirname(latest.path.rstrip("/")),
            latest.path,
        )
    else:
        return None
    return checkpoints.newest_loadable(
        fs,
        run_dir,
        run_dir,
        first=first,
        map_location=device,
        on_skip=lambda where, exc: say(
            f"[train] checkpoint {where} is unusable ({exc}); trying the next older one"
        ),
    )


def restore(state: TrainState, found: tuple[str, dict] | None, cfg: Config, device) -> None:
    """Continue from ``found`` (see :func:`find_checkpoint`) where there is one."""
    if found is None:
        return
    path, ckpt = found
    state.step, state.epoch = restore_checkpoint(
        ckpt, state.nets, state.opts, state.scheds, state.pools, device
    )
    state.metrics = dict(ckpt.get("metrics") or {})
    # A population-based search may hand over another trial's state with a new lr.
    for sched in state.scheds.values():
        if sched.base_lrs[0] != cfg.optim.lr:
            set_base_lr(sched, cfg.optim.lr)
    say(f"[train] resuming from {path} (step {state.step})")


def wrap(nets: CycleGANNets, cfg: Config, world_size: int) -> CycleGANNets:
    """channels_last, DDP across ranks, torch.compile: as the config asks."""
    wrapped = {}
    for name, net in nets.items():
        if cfg.train.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net = ray.train.torch.prepare_model(net) if world_size > 1 else net
        wrapped[name] = torch.compile(net) if cfg.train.compile else net
    return CycleGANNets(**wrapped)


def load_fault_hooks():
    """The test suite's fault-injection module, where a test names one; else None."""
    path = os.environ.get(FAULT_HOOKS_ENV)
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("cyclegan_fault_hooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_finite(losses: dict[str, float], step: int, cfg: Config, batch) -> bool:
    """False for a step with a NaN/Inf loss; with ``on_nonfinite=stop`` it raises instead,
    naming the step, the losses and the images of the batch."""
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad and cfg.train.on_nonfinite == "stop":
        raise NonFiniteLoss(
            f"non-finite loss at step {step} ({', '.join(bad)}) on images "
            f"A {', '.join(batch.keys_A)} and B {', '.join(batch.keys_B)}; the run stops here "
            "and the last checkpoint (written before this step) is kept"
        )
    return not bad


class Progress:
    """Rank 0's metrics, progress lines and sample grids; every other rank only counts."""

    def __init__(
        self, plan: RunPlan, rank: int, world: int, device, start_step: int, last: int,
        entered: float,
    ):  # fmt: skip
        cfg = plan.config
        self.cfg, self.rank, self.last = cfg, rank, last
        self.images_per_step = world * cfg.data.batch_size
        self.sink = (
            MlflowSink(plan.tracking_uri, plan.run_id, cfg.tracking.system_metrics)
            if rank == 0
            else NullSink()
        )
        # The sample grid's fixed inputs load beside the first steps; the first step waits
        # for them, so a dataset without readable samples still fails at once.
        self.device, self.samples, self._loading = device, None, None
        if rank == 0:
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="samples")
            self._loading = pool.submit(load_samples, plan.data_uri, cfg.data, cfg.data.num_samples)
            pool.shutdown(wait=False)
        self.t_start = self.t_interval = time.perf_counter()
        self.step_start, self.wait, self.steps = start_step, 0.0, 0
        # The start-up timeline: the driver's milestones, then this worker's.
        self.plan, self.startup = plan, {**plan.startup, "worker": entered, "ready": time.time()}

    def waited(self, seconds: float) -> None:
        self.wait += seconds
        self.steps += 1
        if self.startup is not None and "first_batch" not in self.startup:
            self.startup["first_batch"] = time.time()

    def stepped(self, step: int) -> None:
        """After each step: the first one ends the start-up timeline, which rank 0 logs as
        ``startup/<milestone>_s``, seconds from the command's start (``plan.started_at``)."""
        if self.startup is None:
            return
        timeline, self.startup = self.startup, None
        timeline["first_step"] = time.time()
        if self._loading is not None:
            loaded, self._loading = self._loading.result(), None
            self.samples = {d: to_input(x.to(self.device)) for d, x in loaded.items()}
        if self.rank != 0 or not self.plan.started_at:
            return
        start = self.plan.started_at
        for key in ("worker", "ready", "first_batch", "first_step"):
            timeline[key] = timeline[key] - start
        self.sink.log_metrics({f"startup/{k}_s": v for k, v in timeline.items()}, step)

    def log(self, losses: dict, state: TrainState, steps_per_epoch: int, finite: bool) -> None:
        step = state.step
        if not (step % self.cfg.train.log_every == 0 or step == self.last):
            return
        now = time.perf_counter()
        elapsed = now - self.t_interval
        metrics = {
            **losses,
            "lr": state.opts.G.param_groups[0]["lr"],
            "throughput/images_per_s": self.steps * self.images_per_step / elapsed,
            "data/wait_fraction": self.wait / elapsed,
            "epoch": state.epoch + (step % steps_per_epoch) / steps_per_epoch,
            "nonfinite_steps": float(not finite),
            # Peak resident memory of this worker process so far (Linux reports KiB).
            "memory/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        self.sink.log_metrics(metrics, step)
        if self.rank == 0:
            rate = (step - self.step_start) / (now - self.t_start)
            eta = (self.last - step) / rate if rate > 0 else float("nan")
            say(
                f"[train] epoch {state.epoch} step {step}/{self.last} G {losses['loss/G']:.3f} "
                f"D_A {losses['loss/D_A']:.3f} D_B {losses['loss/D_B']:.3f} "
                f"cyc {losses['loss/cycle_A']:.3f}/{losses['loss/cycle_B']:.3f} "
                f"{metrics['throughput/images_per_s']:.1f} img/s "
                f"wait {100 * metrics['data/wait_fraction']:.0f}% ETA {eta:.0f}s"
            )
        self.t_interval, self.wait, self.steps = now, 0.0, 0

    def sample(self, nets: CycleGANNets, step: int) -> None:
        """The grid of rows real_A, fake_B, rec_A, real_B, fake_A, rec_B on held-out images."""
        if self.rank != 0 or not (step % self.cfg.train.sample_every == 0 or step == self.last):
            return
        a, b = self.samples["A"], self.samples["B"]
        out = translate_cycle(nets, a, b)
        grid = label_rows(
            image_grid([a, out["fake_B"], out["rec_A"], b, out["fake_A"], out["rec_B"]]),
            ("real_A", "fake_B", "rec_A", "real_B", "fake_A", "rec_B"),
        )
        self.sink.log_image(grid, "samples", step)


class Evaluator:
    """Held-out scores on rank 0: the paired label scores, else FID/KID where weights are set
    (the Inception net is loaded on first use)."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan, self.cfg = plan, plan.config
        self.enabled = plan.paired or bool(self.cfg.train.fid_weights)
        self.extractor = None
        self.last: dict[str, float] = {}

    def due(self, step: int, epoch_end: bool, last_step: int) -> bool:
        every = self.cfg.train.eval_every
        return self.enabled and (step == last_step or (step % every == 0 if every else epoch_end))

    def scores(self, nets: CycleGANNets) -> dict[str, float]:
        from pipeline.scoring import default_extractor, paired_scores, unpaired_eval_scores

        size, limit, uri = self.cfg.data.crop_size, self.cfg.train.eval_limit, self.plan.data_uri
        if self.plan.paired:
            scores = paired_scores(nets.G_A, nets.G_B, uri, size, limit)
        else:
            if self.extractor is None:
                weights = self.cfg.train.fid_weights
                self.extractor = default_extractor(None if weights == "download" else weights)
            scores = unpaired_eval_scores(nets.G_A, nets.G_B, uri, size, limit, self.extractor)
        self.last = {f"eval/{k}": v for k, v in scores.items()}
        return self.last


def checkpoint_due(cfg: Config, step: int, epoch_end: bool, last: int, eval_due: bool) -> bool:
    return step % cfg.train.checkpoint_every == 0 or epoch_end or step == last or eval_due


def save_and_report(runtime, plan, state, losses, progress, evaluator, eval_due) -> None:
    """Every rank reports (a barrier); rank 0 evaluates when due and passes the checkpoint."""
    metrics = {"step": state.step, "epoch": state.epoch, **losses}
    ckpt = None
    if runtime.rank == 0:
        if eval_due or (evaluator.enabled and not evaluator.last):
            progress.sink.log_metrics(evaluator.scores(state.nets), state.step)
        metrics.update(evaluator.last)
        ckpt = state_checkpoint(plan, state, losses)
        if plan.sweep_trial:
            progress.sink.flush()
    checkpoints.report(runtime, metrics, ckpt, say)


def state_checkpoint(plan: RunPlan, state: TrainState, losses: dict[str, float]) -> dict:
    return make_checkpoint(
        step=state.step,
        epoch=state.epoch,
        config=plan.public_dict()["config"],
        nets=state.nets,
        optimizers=state.opts,
        schedulers=state.scheds,
        pools=state.pools,
        mlflow_run_id=plan.run_id,
        metrics=losses,
    )


def report_finished(runtime, state: TrainState, evaluator: Evaluator) -> None:
    """A run restored at its last step (a sweep resumed after the run had ended) trains no
    more, but reports once, without a new checkpoint: whoever waits for its result (Tune's
    scheduler) gets the step and the held-out scores."""
    # The losses of the step the checkpoint was taken at: a scheduler that ranks trials by a
    # loss (population-based training) finds it in this report too.
    metrics = {**state.metrics, "step": state.step, "epoch": state.epoch}
    if runtime.rank == 0 and evaluator.enabled:
        metrics.update(evaluator.scores(state.nets))
    runtime.report(metrics, None)


def train_loop(loop_config: dict, runtime: TrainRuntime | TuneRuntime | None = None) -> None:
    """One rank's training, from its plan (``loop_config["plan"]``) to the planned step."""
    entered = time.time()
    plan: RunPlan = loop_config["plan"]
    console.quiet_ray_loggers(root=True)
    # Temporary files of this process (MLflow writes each sample grid to one before sending
    # it) go to the Ray node's own folder, as checkpoint staging does: a worker killed
    # mid-write leaves nothing in the node's /tmp.
    tempfile.tempdir = checkpoints.staging_base()
    cfg, runtime = plan.config, runtime or TrainRuntime()
    rank, world, device = runtime.rank, runtime.world, runtime.device
    torch.set_num_threads(plan.threads_per_worker)
    keep_freed_memory()
    cpu_priority.ensure_normal()

    # The data first: Ray Data starts reading while the nets are built.
    found = find_checkpoint(runtime, plan, device)
    start_step = found[1]["step"] if found else 0
    shards = {d: runtime.shard(d) for d in ("A", "B")}
    batches = UnpairedBatches(
        shards, plan.counts, cfg.data, world, rank, cfg.train.seed, start_step=start_step
    )
    state = build_state(cfg, rank, device)
    restore(state, found, cfg, device)
    torch.manual_seed(cfg.train.seed + 1 + rank + 7919 * state.step)
    state.nets = wrap(state.nets, cfg, world)
    steps_per_epoch = batches.plan.steps_per_epoch
    last_step = total_steps(cfg, steps_per_epoch)
    dtype = autocast_dtype(cfg, device)
    progress = Progress(plan, rank, world, device, state.step, last_step, entered)
    evaluator = Evaluator(plan)
    hooks = load_fault_hooks()
    if rank == 0:
        say(f"[train] {world} worker(s), {steps_per_epoch} steps/epoch, steps {state.step} -> "
            f"{last_step}, precision {dtype or torch.float32}, device {device}")  # fmt: skip
    if state.step >= last_step:
        report_finished(runtime, state, evaluator)
    try:
        while state.step < last_step:
            t0 = time.perf_counter()
            batch = batches.next()
            progress.waited(time.perf_counter() - t0)
            real_A = to_input(batch.A.to(device), cfg.train.channels_last)
            real_B = to_input(batch.B.to(device), cfg.train.channels_last)
            if hooks is not None:
                real_A = hooks.before_step(state.step + 1, rank, real_A)
            losses = train_step(
                state.nets, state.opts, state.pools, real_A, real_B, cfg.loss, dtype,
                fuse_calls=cfg.model.norm != "batch",
                skip_nonfinite=cfg.train.on_nonfinite == "skip",
            )  # fmt: skip
            state.step += 1
            progress.stepped(state.step)
            finite = check_finite(losses, state.step, cfg, batch)
            epoch_end = state.step % steps_per_epoch == 0
            if epoch_end:
                state.epoch += 1
                for sched in state.scheds.values():
                    sched.step()
            progress.log(losses, state, steps_per_epoch, finite)
            progress.sample(state.nets, state.step)
            eval_due = evaluator.due(state.step, epoch_end, last_step)
            if checkpoint_due(cfg, state.step, epoch_end, last_step, eval_due):
                save_and_report(runtime, plan, state, losses, progress, evaluator, eval_due)
    finally:
        batches.close()
        # Also on failure: the metrics queued before it still reach the run (or are named).
        progress.sink.close()
