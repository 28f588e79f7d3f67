"""The loop each Ray Train worker runs: build, restore, wrap for DDP, then step, log, checkpoint."""

from __future__ import annotations

import math
import os
import posixpath
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import ray.tune
import torch

from cyclegan.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from cyclegan.schedules import build_scheduler, set_base_lr
from cyclegan.train_step import (
    CycleGANNets,
    build_nets,
    build_optimizers,
    build_pools,
    train_step,
    translate_cycle,
)
from cyclegan.transforms import image_grid, to_input
from pipeline.config import Config, from_dict
from pipeline.data import UnpairedBatches, load_samples
from pipeline.evaluate import default_extractor, paired_scores, unpaired_eval_scores
from pipeline.tracking import MlflowSink, NullSink

CHECKPOINT_FILE = "checkpoint.pt"


class NonFiniteLoss(RuntimeError):
    pass


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 where it was chosen, or on 'auto' where the hardware runs it fast."""
    if cfg.train.precision == "bf16":
        return torch.bfloat16
    if cfg.train.precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    planned = cfg.optim.total_epochs * steps_per_epoch
    return min(planned, cfg.train.max_steps) if cfg.train.max_steps else planned


def say(message: str) -> None:
    """One progress line on stdout. Written directly: Ray Train patches ``print`` in workers
    to go through its logger, which shows every line twice on the driver."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Test hook: ``CYCLEGAN_FAULT_STEP``/``_RANK``/``_MARKER`` make one rank die hard once."""
    at = os.environ.get("CYCLEGAN_FAULT_STEP")
    if at is None or step != int(at) or rank != int(os.environ.get("CYCLEGAN_FAULT_RANK", "0")):
        return
    marker = os.environ.get("CYCLEGAN_FAULT_MARKER")
    if marker and os.path.exists(marker):
        return
    if marker:
        Path(marker).touch()
    os._exit(1)


def _nan_injected(step: int) -> bool:
    return os.environ.get("CYCLEGAN_FAULT_NAN_STEP") == str(step)


def _wrap(nets: CycleGANNets, cfg: Config, world_size: int) -> CycleGANNets:
    wrapped = {}
    for name, net in nets.items():
        if cfg.train.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net = ray.train.torch.prepare_model(net) if world_size > 1 else net
        wrapped[name] = torch.compile(net) if cfg.train.compile else net
    return CycleGANNets(**wrapped)


def _load(checkpoint: ray.train.Checkpoint, device: torch.device) -> dict:
    with checkpoint.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device)


def load_resume_state(latest: ray.train.Checkpoint, device: torch.device) -> dict:
    """The newest loadable checkpoint of the run: the one Ray hands over or, when that one is
    truncated or altered, the newest older one in the same run folder."""
    try:
        return _load(latest, device)
    except (ValueError, FileNotFoundError) as exc:
        say(f"[train] latest checkpoint is unusable: {exc}; trying older checkpoints")
    fs = latest.filesystem
    run_dir = posixpath.dirname(latest.path.rstrip("/"))
    older = sorted(
        (
            info.path
            for info in fs.get_file_info(pafs.FileSelector(run_dir))
            if info.type == pafs.FileType.Directory
            and info.base_name.startswith("checkpoint_")
            and info.path.rstrip("/") != latest.path.rstrip("/")
        ),
        reverse=True,  # names carry the creation time
    )
    for path in older:
        try:
            state = _load(ray.train.Checkpoint(path, filesystem=fs), device)
        except (ValueError, FileNotFoundError) as exc:
            say(f"[train] checkpoint {path} is unusable too: {exc}")
            continue
        say(f"[train] resuming from {path} (step {state['step']})")
        return state
    raise RuntimeError(f"no loadable checkpoint in {run_dir}")


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


STAGING_PREFIX = "cyclegan-checkpoint-"
"""Checkpoint staging folders are named ``STAGING_PREFIX + pid + "-" + random``."""


def remove_orphaned_staging(base: str) -> list[str]:
    """Remove the checkpoint staging folders under ``base`` whose process is gone (a worker
    killed while reporting leaves its folder, a whole checkpoint, behind); returns their paths."""
    removed = []
    with os.scandir(base) as entries:
        for entry in entries:
            pid = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
            if not (entry.name.startswith(STAGING_PREFIX) and pid.isdigit()):
                continue
            if not entry.is_dir(follow_symlinks=False) or _process_exists(int(pid)):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _report(runtime, metrics: dict, ckpt: dict | None) -> None:
    """A barrier on every rank; only rank 0 passes the checkpoint."""
    if ckpt is None:
        runtime.report(metrics, None)
        return
    base = tempfile.gettempdir()
    for path in remove_orphaned_staging(base):
        say(f"[train] removed {path}, left by a worker that was killed while reporting")
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=base) as tmp:
        save_checkpoint(ckpt, Path(tmp) / CHECKPOINT_FILE)
        runtime.report(metrics, runtime.checkpoint_class.from_directory(tmp))


def train_loop(loop_config: dict, runtime: TrainRuntime | TuneRuntime | None = None) -> None:
    runtime = runtime or TrainRuntime()
    cfg = from_dict(loop_config["config"])
    run_id = loop_config["run_id"]
    counts = loop_config["counts"]
    rank, world, device = runtime.rank, runtime.world, runtime.device
    torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))

    # Identical initial weights on every rank; per-rank randomness (pools) seeded by rank.
    torch.manual_seed(cfg.train.seed)
    nets = build_nets(cfg.model)
    for _, net in nets.items():
        net.to(device)
    opts = build_optimizers(nets, cfg.optim, fused=device.type == "cuda" or None)
    scheds = {"G": build_scheduler(opts.G, cfg.optim), "D": build_scheduler(opts.D, cfg.optim)}
    pools = build_pools(cfg.loss.pool_size, cfg.train.seed * 1000 + 2 * rank)
    step = epoch = 0
    resumed = runtime.checkpoint()
    if resumed is not None:
        state = load_resume_state(resumed, device)
        step, epoch = restore_checkpoint(state, nets, opts, scheds, pools, device)
        # A population-based search may hand over another trial's state with a new lr.
        for sched in scheds.values():
            if sched.base_lrs[0] != cfg.optim.lr:
                set_base_lr(sched, cfg.optim.lr)
    torch.manual_seed(cfg.train.seed + 1 + rank + 7919 * step)
    nets = _wrap(nets, cfg, world)

    batches = UnpairedBatches(
        {d: runtime.shard(d) for d in ("A", "B")},
        counts,
        cfg.data,
        world,
        rank,
        cfg.train.seed,
        start_step=step,
    )
    steps_per_epoch = batches.plan.steps_per_epoch
    last_step = total_steps(cfg, steps_per_epoch)
    dtype = autocast_dtype(cfg, device)
    fuse = cfg.model.norm != "batch"
    sink = (
        MlflowSink(loop_config["tracking_uri"], run_id, cfg.tracking.system_metrics)
        if rank == 0
        else NullSink()
    )
    samples = None
    if rank == 0:
        samples = {
            d: to_input(x.to(device))
            for d, x in load_samples(
                loop_config["data_uri"], cfg.data, cfg.data.num_samples
            ).items()
        }
        say(
            f"[train] {world} worker(s), {steps_per_epoch} steps/epoch, steps {step} -> {last_step}, "
            f"precision {dtype or torch.float32}, device {device}",
        )

    data_uri, paired = loop_config["data_uri"], loop_config.get("paired", False)
    evaluating = paired or bool(cfg.train.fid_weights)
    extractor = None

    def evaluation() -> dict[str, float]:
        """Paired label scores, else FID/KID (the Inception net is loaded on first use)."""
        nonlocal extractor
        size, limit = cfg.data.crop_size, cfg.train.eval_limit
        if paired:
            return paired_scores(nets.G_A, nets.G_B, data_uri, size, limit)
        if extractor is None:
            weights = cfg.train.fid_weights
            extractor = default_extractor(None if weights == "download" else weights)
        return unpaired_eval_scores(nets.G_A, nets.G_B, data_uri, size, limit, extractor)

    last_eval: dict[str, float] = {}
    images_per_step = world * cfg.data.batch_size
    t_interval, wait_interval, steps_interval = time.perf_counter(), 0.0, 0
    t_start, step_start = time.perf_counter(), step
    try:
        while step < last_step:
            t0 = time.perf_counter()
            a, b = batches.next()
            wait_interval += time.perf_counter() - t0
            real_A = to_input(a.to(device), cfg.train.channels_last)
            real_B = to_input(b.to(device), cfg.train.channels_last)
            if _nan_injected(step + 1):
                real_A = real_A * float("nan")
            _maybe_inject_fault(step + 1, rank)
            losses = train_step(
                nets,
                opts,
                pools,
                real_A,
                real_B,
                cfg.loss,
                dtype,
                fuse,
                skip_nonfinite=cfg.train.on_nonfinite == "skip",
            )
            step += 1
            steps_interval += 1
            bad = [k for k, v in losses.items() if not math.isfinite(v)]
            if bad and cfg.train.on_nonfinite == "stop":
                raise NonFiniteLoss(
                    f"non-finite loss at step {step} ({', '.join(bad)}); the run stops here and the "
                    "last checkpoint (written before this step) is kept"
                )
            epoch_end = step % steps_per_epoch == 0
            if epoch_end:
                epoch += 1
                for s in scheds.values():
                    s.step()

            if step % cfg.train.log_every == 0 or step == last_step:
                now = time.perf_counter()
                elapsed = now - t_interval
                metrics = dict(losses)
                metrics["lr"] = opts.G.param_groups[0]["lr"]
                metrics["throughput/images_per_s"] = steps_interval * images_per_step / elapsed
                metrics["data/wait_fraction"] = wait_interval / elapsed
                metrics["epoch"] = epoch + (step % steps_per_epoch) / steps_per_epoch
                metrics["nonfinite_steps"] = float(len(bad) > 0)
                # Peak resident memory of this worker process so far (Linux reports KiB).
                metrics["memory/peak_rss_mib"] = (
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                )
                sink.log_metrics(metrics, step)
                if rank == 0:
                    rate = (step - step_start) / (now - t_start)
                    eta = (last_step - step) / rate if rate > 0 else float("nan")
                    say(
                        f"[train] epoch {epoch} step {step}/{last_step} "
                        f"G {losses['loss/G']:.3f} D_A {losses['loss/D_A']:.3f} D_B {losses['loss/D_B']:.3f} "
                        f"cyc {losses['loss/cycle_A']:.3f}/{losses['loss/cycle_B']:.3f} "
                        f"{metrics['throughput/images_per_s']:.1f} img/s "
                        f"wait {100 * metrics['data/wait_fraction']:.0f}% ETA {eta:.0f}s",
                    )
                t_interval, wait_interval, steps_interval = now, 0.0, 0

            if rank == 0 and (step % cfg.train.sample_every == 0 or step == last_step):
                out = translate_cycle(nets, samples["A"], samples["B"])
                grid = image_grid(
                    [
                        samples["A"],
                        out["fake_B"],
                        out["rec_A"],
                        samples["B"],
                        out["fake_A"],
                        out["rec_B"],
                    ]
                )
                sink.log_image(grid, "samples", step)

            eval_due = evaluating and (
                step == last_step
                or (epoch_end if not cfg.train.eval_every else step % cfg.train.eval_every == 0)
            )
            if step % cfg.train.checkpoint_every == 0 or epoch_end or step == last_step or eval_due:
                metrics = {"step": step, "epoch": epoch, **losses}
                ckpt = None
                if rank == 0:
                    if eval_due or (evaluating and not last_eval):
                        scores = evaluation()
                        last_eval = {f"eval/{k}": v for k, v in scores.items()}
                        sink.log_metrics(last_eval, step)
                    metrics.update(last_eval)
                    ckpt = make_checkpoint(
                        step=step,
                        epoch=epoch,
                        config=cfg.to_dict(),
                        nets=nets,
                        optimizers=opts,
                        schedulers=scheds,
                        pools=pools,
                        mlflow_run_id=run_id,
                    )
                _report(runtime, metrics, ckpt)
    finally:
        batches.close()
    sink.close()
