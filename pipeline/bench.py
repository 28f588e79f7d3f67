"""Benchmarks: the train step alone, the data path, and short training runs.

    python -m pipeline.bench step --preset demo --no-compile --repeats 15   # about a minute
    python -m pipeline.bench step --preset demo --variants fp32,bf16,compile,compile_bf16
    python -m pipeline.bench step --preset paper --no-compile               # several minutes
    python -m pipeline.bench step --preset paper --variants fp32,bf16 --threads 1 --json p.json
    python -m pipeline.bench data --load-size 286 --crop-size 256 --workers 1,2 --json data.json
    python -m pipeline.bench train --preset demo --max-steps 150 --workers 1,2 --json train.json

``step`` runs each variant (fp32, bf16 autocast, channels_last, torch.compile, ...) in its own
process, so peak memory and compile caches are per variant; the parent times the variants in
turn (A B C A B C ...), so a machine that gets busier or quieter mid-run shifts every variant
alike, and each speedup is the median of per-round ratios against fp32 eager. Each timing also
records the share of the machine's CPU time other processes took meanwhile; on a shared machine
multi-threaded steps slow down many times over when another process takes a core, so medians
over quiet rounds are reported beside those over all rounds. ``images/s`` counts one (A, B)
pair as one image, as the training metric ``throughput/images_per_s`` does. FLOPs are those of
the convolutions and matmuls of one whole train step, forward and backward, counted once with
``torch.utils.flop_counter.FlopCounterMode``.

``data`` and ``train`` start a local Ray: run them when no other Ray cluster runs on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import io
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import config as C

REPO = Path(__file__).resolve().parents[1]

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's datasheets; the first name
# found in the device name wins, so specific names come first. A10G is AWS's A10 variant and
# has no figure of its own: the A10 one is an upper bound for it.
GPU_BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 125.0),
    ("A10", 125.0),
)

# (warm-up steps, timed rounds, steps per round) per preset: a few minutes on 2 CPU cores.
STEP_REPEATS = {"tiny": (1, 3, 5), "demo": (2, 7, 5), "paper128": (1, 5, 2), "paper": (1, 5, 2)}
COMPILE_WARMUP = 6  # G and D see two batch shapes and two requires_grad states: recompiles


@dataclass(frozen=True)
class Variant:
    """How the nets run: autocast dtype, memory format, torch.compile."""

    name: str
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False


VARIANTS = {
    v.name: v
    for v in (
        Variant("fp32"),
        Variant("bf16", bf16=True),
        Variant("channels_last", channels_last=True),
        Variant("bf16_channels_last", bf16=True, channels_last=True),
        Variant("compile", compile=True),
        Variant("compile_bf16", bf16=True, compile=True),
    )
}


# environment and statistics


def environment(preset: str) -> dict:
    """What the numbers were measured on."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if "model name" in ln), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in cpuinfo if ln.startswith("flags")), []))
    versions = {}
    for pkg in ("torch", "torchvision", "ray", "mlflow", "pyarrow", "pillow", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_model": model or platform.processor(),
        "cpu_flags": {f: f in flags for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")},
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": versions,
        "preset": preset,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "loadavg_at_start": os.getloadavg(),
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def summarize(values: list[float]) -> dict:
    """Median, min, max and quartiles of ``values`` (kept too, in measurement order)."""
    xs = sorted(values)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    return {
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": q1,
        "q3": q3,
        "n": len(xs),
        "samples": list(values),
    }


def gpu_peak_tflops(name: str | None) -> float | None:
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if name and key.lower() in name.lower():
            return tflops
    return None


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in KiB (0 where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        tick = os.sysconf("SC_CLK_TCK")
        return (sum(fields) - fields[3] - fields[4]) / tick, sum(fields) / tick
    return 0.0, 0.0


def _release_free_memory() -> None:
    # Idle variant processes wait while the others run; handing freed heap back to the OS keeps
    # their resident memory (and the pressure on the others) at what they actually hold.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# step: one variant's nets, stepped on demand


class StepRunner:
    """Nets, optimizers, pools and random inputs of one variant; ``run(n)`` times n steps."""

    def __init__(self, cfg: C.Config, batch_size: int, variant: Variant, device: str, seed: int):
        from cyclegan.train_step import build_nets, build_optimizers, build_pools

        self.cfg, self.variant, self.device = cfg, variant, torch.device(device)
        torch.manual_seed(seed)
        nets = build_nets(cfg.model)
        fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
        for _, net in nets.items():
            net.to(self.device, memory_format=fmt)
        self.opts = build_optimizers(nets, cfg.optim, fused=self.device.type == "cuda" or None)
        if variant.compile:
            for name, net in nets.items():
                setattr(nets, name, torch.compile(net))
        self.nets = nets
        self.pools = build_pools(cfg.loss.pool_size, seed)
        gen = torch.Generator().manual_seed(seed)
        shape = (batch_size, cfg.model.input_nc, cfg.data.crop_size, cfg.data.crop_size)
        self.inputs = [
            tuple(
                (torch.rand(shape, generator=gen) * 2 - 1)
                .to(self.device)
                .contiguous(memory_format=fmt)
                for _ in "AB"
            )
            for _ in range(2)
        ]
        self.steps = 0

    def step(self) -> dict[str, float]:
        from cyclegan.train_step import train_step

        real_A, real_B = self.inputs[self.steps % len(self.inputs)]
        self.steps += 1
        return train_step(
            self.nets,
            self.opts,
            self.pools,
            real_A,
            real_B,
            self.cfg.loss,
            torch.bfloat16 if self.variant.bf16 else None,
            self.cfg.model.norm != "batch",
        )

    def run(self, n: int) -> tuple[float, float]:
        """Wall and CPU seconds of ``n`` steps (train_step returns floats: each step syncs)."""
        self._sync()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            self.step()
        self._sync()
        return time.perf_counter() - t0, time.process_time() - cpu0

    def flops(self) -> int:
        """Conv and matmul FLOPs of one train step, forward and backward."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.step()
        return int(counter.get_total_flops())

    def memory(self) -> dict:
        out = {"peak_rss_mib": _status_kib("VmHWM") / 1024}
        if self.device.type == "cuda":
            out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def train_step_flops(cfg: C.Config, batch_size: int, device: str = "cpu") -> int:
    """FLOPs of one fp32 train step of ``cfg``'s nets on ``batch_size`` random crops."""
    return StepRunner(cfg, batch_size, VARIANTS["fp32"], device, seed=0).flops()


def _step_process(conn, spec: dict) -> None:
    """A variant's process: build a StepRunner, then answer (command, arg) until 'stop'."""
    torch.set_num_threads(spec["threads"])
    base_rss = _status_kib("VmRSS") / 1024
    try:
        cfg = C.preset(spec["preset"])
        runner = StepRunner(cfg, spec["batch_size"], VARIANTS[spec["variant"]], spec["device"], 0)
        conn.send(("ok", {"base_rss_mib": base_rss}))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        command, arg = conn.recv()
        if command == "stop":
            return
        try:
            if command == "run":
                value = runner.run(arg)
            elif command == "warmup":
                value = [runner.run(1)[0] for _ in range(arg)]
            elif command == "flops":
                value = runner.flops()
            elif command == "memory":
                value = runner.memory()
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", value))
        except Exception:
            conn.send(("error", traceback.format_exc()))
        _release_free_memory()


class VariantProcess:
    """The parent's handle on one variant's process."""

    def __init__(self, ctx, spec: dict):
        self.name = spec["variant"]
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_step_process, args=(child, spec))
        self.process.start()
        child.close()
        self.info = self._answer()

    def call(self, command: str, arg=None):
        self.conn.send((command, arg))
        return self._answer()

    def _answer(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(
                f"variant {self.name}: its process exited (code {self.process.exitcode})"
            ) from None
        if status == "error":
            raise RuntimeError(f"variant {self.name} failed:\n{value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(("stop", None))
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def bench_step(args: argparse.Namespace) -> dict:
    cfg = C.preset(args.preset)
    batch = args.batch_size or cfg.data.batch_size
    warmup, repeats, per_round = STEP_REPEATS.get(args.preset, (1, 5, 2))
    warmup = args.warmup if args.warmup is not None else warmup
    repeats = args.repeats or repeats
    per_round = args.steps_per_repeat or per_round
    names = [n.strip() for n in args.variants.split(",")] if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    names = [n for n in names if not (args.no_compile and n in VARIANTS and VARIANTS[n].compile)]
    if unknown or not names:
        raise ValueError(f"--variants: {unknown or 'none'}; choose from {', '.join(VARIANTS)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or len(os.sched_getaffinity(0))
    spec = {"preset": args.preset, "batch_size": batch, "device": device, "threads": threads}
    print(
        f"[bench] step: preset {args.preset}, {cfg.data.crop_size} px, batch {batch}, "
        f"{device}, {threads} threads; warm-up {warmup}, {repeats} rounds x {per_round} steps",
        flush=True,
    )
    ctx = mp.get_context("spawn")
    results: dict[str, dict] = {}
    procs: dict[str, VariantProcess] = {}
    flops = None
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                procs[name] = VariantProcess(ctx, {**spec, "variant": name})
                if flops is None and not VARIANTS[name].compile:
                    flops = procs[name].call("flops")  # one real step: counts as warm-up too
                n_warm = max(warmup, COMPILE_WARMUP if VARIANTS[name].compile else 0)
                results[name] = {"ok": True, "warmup_s": procs[name].call("warmup", n_warm)}
                results[name].update(procs[name].info)
            except RuntimeError as exc:
                results[name] = {"ok": False, "error": str(exc)}
                if name in procs:
                    procs.pop(name).close()
            status = (
                "ok" if results[name]["ok"] else "FAILED: " + _last_line(results[name]["error"])
            )
            print(
                f"[bench] {name}: ready in {time.perf_counter() - t0:.1f} s, {status}", flush=True
            )
        if flops is None:
            counter = VariantProcess(ctx, {**spec, "variant": "fp32"})
            try:
                flops = counter.call("flops")
            finally:
                counter.close()
        print(f"[bench] {flops / 1e9:.3f} GFLOP per step (forward + backward)", flush=True)
        times: dict[str, list[float]] = {name: [] for name in procs}
        # The share of the machine's CPU time that other processes took while a variant ran:
        # the machine may be shared, and contention slows multi-threaded steps a lot.
        others: dict[str, list[float]] = {name: [] for name in procs}
        for r in range(repeats):
            for name, proc in procs.items():
                busy0, total0 = cpu_busy_seconds()
                wall, cpu = proc.call("run", per_round)
                busy1, total1 = cpu_busy_seconds()
                times[name].append(wall / per_round)
                others[name].append(max(0.0, busy1 - busy0 - cpu) / max(total1 - total0, 1e-9))
            line = ", ".join(
                f"{n} {1e3 * t[-1]:.0f} ({100 * others[n][-1]:.0f}%)" for n, t in times.items()
            )
            print(
                f"[bench] round {r + 1}/{repeats}, ms/step (others' CPU share): {line}",
                flush=True,
            )
        for name, proc in procs.items():
            results[name].update(proc.call("memory"))
    finally:
        for proc in procs.values():
            proc.close()

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak = gpu_peak_tflops(gpu)
    for name, step_s in times.items():
        res = results[name]
        res["ms_per_step"] = summarize([1e3 * s for s in step_s])
        res["images_per_s"] = summarize([batch / s for s in step_s])
        res["others_cpu_share"] = summarize(others[name])
        median_s = statistics.median(step_s)
        res["achieved_gflop_per_s"] = flops / median_s / 1e9
        res["fraction_of_peak"] = flops / median_s / (peak * 1e12) if peak else None
        # Quiet rounds: other processes took less than --quiet-below of the CPUs meanwhile.
        quiet = [r for r, share in enumerate(others[name]) if share < args.quiet_below]
        res["quiet_rounds"] = quiet
        res["ms_per_step_quiet"] = summarize([1e3 * step_s[r] for r in quiet]) if quiet else None
        if "fp32" in times:
            ratios = [f / s for f, s in zip(times["fp32"], step_s, strict=True)]
            res["speedup_vs_fp32"] = summarize(ratios)
            both = [r for r in quiet if others["fp32"][r] < args.quiet_below]
            res["speedup_vs_fp32_quiet"] = summarize([ratios[r] for r in both]) if both else None
        if VARIANTS[name].compile and res["warmup_s"]:
            # Warm-up steps beyond what steady steps cost: compiling (and recompiling).
            res["compile_s"] = sum(res["warmup_s"]) - len(res["warmup_s"]) * median_s
    return {
        "command": "step",
        "preset": args.preset,
        "crop_size": cfg.data.crop_size,
        "batch_size": batch,
        "model": cfg.model.__dict__,
        "device": device,
        "threads": threads,
        "warmup": warmup,
        "repeats": repeats,
        "steps_per_repeat": per_round,
        "flops_per_step": flops,
        "gpu_bf16_peak_tflops": peak,
        "quiet_below": args.quiet_below,
        "variants": results,
    }


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def print_step(res: dict) -> None:
    flop = res["flops_per_step"]
    peak = res["gpu_bf16_peak_tflops"]
    print(
        f"\n{'':<20}{'all rounds':-^42}  {'quiet rounds':-^25}\n"
        f"{'variant':<20}{'img/s':>7}  {'ms/step median [min-max]':<25}{'vs fp32':>8}"
        f"  {'ms/step (n)':<15}{'vs fp32':>8}  {'others':>6}{'peak MiB':>9}{'GFLOP/step':>11}"
        f"{'GFLOP/s':>8}" + ("  % of bf16 peak" if peak else "")
    )
    best = None
    for name, v in res["variants"].items():
        if not v["ok"]:
            print(f"{name:<20}FAILED: {_last_line(v['error'])}")
            continue
        ms, speed = v["ms_per_step"], v.get("speedup_vs_fp32")
        qms, qspeed = v["ms_per_step_quiet"], v.get("speedup_vs_fp32_quiet")
        mem = v.get("cuda_max_allocated_mib", v["peak_rss_mib"])
        spread = f"{ms['median']:.1f} [{ms['min']:.1f}-{ms['max']:.1f}]"
        quiet = f"{qms['median']:.1f} ({qms['n']})" if qms else "-"
        line = (
            f"{name:<20}{v['images_per_s']['median']:>7.2f}  {spread:<25}{_ratio(speed):>8}"
            f"  {quiet:<15}{_ratio(qspeed):>8}  {100 * v['others_cpu_share']['median']:>5.0f}%"
            f"{mem:>9.0f}{flop / 1e9:>11.2f}{v['achieved_gflop_per_s']:>8.1f}"
        )
        if v["fraction_of_peak"] is not None:
            line += f"  {100 * v['fraction_of_peak']:.2f}%"
        if "compile_s" in v:
            line += f"  (compile about {v['compile_s']:.0f} s)"
        print(line)
        speed = qspeed or speed
        if speed and (best is None or speed["median"] > best[1]):
            best = (name, speed["median"])
    print(
        "vs fp32: median of per-round ratios to fp32 eager; others: median share of the "
        "machine's CPU time other processes took while the variant ran; quiet rounds: others "
        f"below {100 * res['quiet_below']:.0f}%; peak MiB: "
        + (
            "resident-set high-water mark of the variant's own process (torch included)"
            if res["device"] == "cpu"
            else "torch.cuda.max_memory_allocated"
        )
    )
    if best:
        print(f"fastest: {best[0]}, {best[1]:.2f}x fp32 eager")


def _ratio(stats: dict | None) -> str:
    return f"{stats['median']:.2f}x" if stats else "-"


# data: Ray Data path vs a DataLoader baseline on the same JPEG shards


def _call_and_send(conn, fn, args) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new (spawned, non-daemon: it may start its own workers) process."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    process = ctx.Process(target=_call_and_send, args=(child, fn, args))
    process.start()
    child.close()
    try:
        status, value = conn.recv()
    except EOFError:
        process.join()
        status, value = "error", f"the process exited with code {process.exitcode}"
    process.join()
    if status == "error":
        raise RuntimeError(f"{fn.__name__} failed:\n{value}")
    return value


def make_jpeg_dataset(root: str, count: int, size: int, seed: int = 0) -> str:
    """Rendered scene photos as JPEG shards (dataset trainA) under ``root``; reused if there."""
    from PIL import Image

    from pipeline.images import encode_image
    from pipeline.shards import (
        DatasetError,
        ShardWriter,
        build_manifest,
        clear_root,
        read_manifest,
        write_manifest,
    )
    from pipeline.storage import StorageError
    from pipeline.synth import render_scene

    source = f"bench:scenes-jpeg size={size} count={count} seed={seed}"
    with contextlib.suppress(DatasetError, StorageError):
        if read_manifest(root).source == source:
            return root
    clear_root(root, overwrite=True)
    with ShardWriter(root, "trainA") as writer:
        for i in range(count):
            photo = Image.fromarray(render_scene(i, size, seed)[1])
            writer.add(f"{i:06d}.jpg", encode_image(photo, "JPEG"), size, size, "JPEG")
        entry = writer.close()
    write_manifest(root, build_manifest(source, {"trainA": entry}))
    return root


class ParquetJpegs(torch.utils.data.Dataset):
    """The baseline's dataset: the same shards, read with pyarrow, decoded with PIL."""

    def __init__(self, paths: list[str], transform):
        import pyarrow.parquet as pq

        self.paths, self.transform = paths, transform
        self.n = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
        self.images: list[bytes] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        import pyarrow.parquet as pq
        from PIL import Image

        if self.images is None:  # loaded once per DataLoader worker process
            self.images = [
                b
                for p in self.paths
                for b in pq.read_table(p, columns=["image"])["image"].to_pylist()
            ]
        return self.transform(Image.open(io.BytesIO(self.images[i])).convert("RGB"))


def _torch_batches(root: str, cfg, cores: int, batch_size: int):
    from torchvision import transforms as T

    from pipeline.shards import read_manifest

    transform = T.Compose(
        [
            T.Resize((cfg.load_size, cfg.load_size), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomCrop(cfg.crop_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    dataset = ParquetJpegs(read_manifest(root).shard_paths("trainA"), transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=cores, persistent_workers=True
    )
    while True:
        for batch in loader:
            yield len(batch)


def _ray_batches(root: str, cfg, batch_size: int):
    from cyclegan.transforms import to_input
    from pipeline.data import DomainStream, domain_dataset
    from pipeline.shards import read_manifest

    manifest = read_manifest(root)
    ds = domain_dataset(manifest, "A", cfg, seed=0)
    # The training worker's own reader: local shuffle, seeded crop + flip per image.
    stream = DomainStream(ds, "A", manifest.count("trainA"), cfg, 0, 0, cfg.shuffle_buffer)
    while True:
        yield len(to_input(stream.next_batch(batch_size)))


def _data_process(path: str, root: str, cfg_dict: dict, cores: int, args: dict) -> dict:
    """One measurement in a fresh process pinned to ``cores`` CPUs (Ray's too: it inherits)."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    torch.set_num_threads(cores)
    cfg = C.DataConfig(**cfg_dict)
    ray = None
    if path == "ray":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        batches = _ray_batches(root, cfg, args["batch_size"])
    else:
        batches = _torch_batches(root, cfg, cores, args["batch_size"])
    try:
        t_start = time.perf_counter()
        for _ in range(args["warmup_batches"]):
            next(batches)
        t0, images = time.perf_counter(), 0
        while time.perf_counter() - t0 < args["seconds"]:
            images += next(batches)
        seconds = time.perf_counter() - t0
    finally:
        batches.close()
        if ray is not None:
            ray.shutdown()
    return {"images": images, "seconds": seconds, "startup_s": t0 - t_start}


def bench_data(args: argparse.Namespace) -> dict:
    cfg = C.DataConfig(load_size=args.load_size, crop_size=args.crop_size)
    root = args.root or os.path.join(C.home(), "bench", f"jpeg-{args.source_size}")
    t0 = time.perf_counter()
    make_jpeg_dataset(root, args.images, args.source_size)
    print(
        f"[bench] data: {args.images} JPEGs of {args.source_size} px at {root} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    workers = [int(n) for n in args.workers.split(",")]
    if max(workers) > len(os.sched_getaffinity(0)):
        raise ValueError(f"--workers: at most {len(os.sched_getaffinity(0))} CPUs here")
    opts = {k: getattr(args, k) for k in ("batch_size", "seconds", "warmup_batches")}
    rates: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for n in workers:
            for path in ("ray", "torch"):
                out = in_fresh_process(_data_process, path, root, cfg.__dict__, n, opts)
                rate = out["images"] / out["seconds"]
                rates.setdefault(f"{path}/{n}", []).append(rate)
                print(
                    f"[bench] round {r + 1}: {path} {n} CPU(s): {rate:.1f} images/s "
                    f"(start-up {out['startup_s']:.1f} s)",
                    flush=True,
                )
    results = {}
    for n in workers:
        ray_r, torch_r = rates[f"ray/{n}"], rates[f"torch/{n}"]
        results[str(n)] = {
            "ray_images_per_s": summarize(ray_r),
            "torch_images_per_s": summarize(torch_r),
            "ray_per_core": statistics.median(ray_r) / n,
            "torch_per_core": statistics.median(torch_r) / n,
            "ray_over_torch": summarize([a / b for a, b in zip(ray_r, torch_r, strict=True)]),
        }
    return {
        "command": "data",
        "root": root,
        "config": {**cfg.__dict__, **opts},
        "images": args.images,
        "source_size": args.source_size,
        "cpus": results,
    }


def print_data(res: dict) -> None:
    print(
        f"\n{'CPUs':<6}{'Ray img/s':>11}{'per core':>10}{'DataLoader img/s':>18}"
        f"{'per core':>10}{'Ray/DataLoader':>16}"
    )
    for n, v in res["cpus"].items():
        print(
            f"{n:<6}{v['ray_images_per_s']['median']:>11.1f}{v['ray_per_core']:>10.1f}"
            f"{v['torch_images_per_s']['median']:>18.1f}{v['torch_per_core']:>10.1f}"
            f"{v['ray_over_torch']['median']:>15.2f}x"
        )


# train: short real runs through pipeline.train.run, read back from MLflow


def _train_process(cfg_dict: dict, home: str) -> dict:
    os.environ["CYCLEGAN_HOME"] = home
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from mlflow import MlflowClient

    from pipeline.train import run

    cfg = C.from_dict(cfg_dict)
    t0 = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - t0
    client = MlflowClient(cfg.tracking.resolved_uri())
    metrics = {}
    for key in ("throughput/images_per_s", "data/wait_fraction"):
        history = sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)
        metrics[key] = [(m.step, m.value) for m in history]
    return {"run_id": result.run_id, "name": result.name, "wall_s": wall, "metrics": metrics}


def _is_dataset(uri: str) -> bool:
    from pipeline.shards import DatasetError, read_manifest
    from pipeline.storage import StorageError

    try:
        read_manifest(uri)
    except (DatasetError, StorageError):
        return False
    return True


def bench_train(args: argparse.Namespace) -> dict:
    from pipeline.synth import write_scenes

    cfg = C.preset(args.preset)
    home = args.home or os.path.join(C.home(), "bench")
    data = args.data or cfg.data.resolved_uri()
    if not args.data and not _is_dataset(data):
        data = os.path.join(home, "data", "scenes")
        if not _is_dataset(data):
            print(f"[bench] writing the built-in scenes to {data}", flush=True)
            write_scenes(data, size=128, train_a=500, train_b=500, test=8, overwrite=True)
    max_steps = args.max_steps or {"tiny": 200, "demo": 150}.get(args.preset, 60)
    log_every = args.log_every or max(1, max_steps // 6)
    runs: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        for n in [int(x) for x in args.workers.split(",")]:
            tree = {
                "data": {"uri": data},
                "train": {
                    "max_steps": max_steps,
                    "log_every": log_every,
                    "sample_every": max_steps,
                    "checkpoint_every": max_steps,
                },
                "scaling": {"num_workers": n, "max_failures": 0},
                "storage": {
                    "uri": os.path.join(home, "checkpoints"),
                    "name": f"bench-{args.preset}-{n}w-{time.strftime('%Y%m%d-%H%M%S')}-{r}",
                },
                "tracking": {
                    "uri": "sqlite:///" + os.path.join(home, "mlflow.db"),
                    "experiment": "bench",
                    "system_metrics": False,
                    "log_model": False,
                },
            }
            run_cfg = C.merge(cfg, tree)
            for item in args.set:
                run_cfg = C.merge(run_cfg, C.parse_override(item))
            out = in_fresh_process(_train_process, run_cfg.to_dict(), home)
            # The first interval holds Ray Data's start-up and the first batches: warm-up.
            rate = [v for _, v in out["metrics"]["throughput/images_per_s"][1:]]
            wait = [v for _, v in out["metrics"]["data/wait_fraction"][1:]]
            out["images_per_s"] = summarize(rate) if rate else None
            out["data_wait_fraction"] = summarize(wait) if wait else None
            runs.setdefault(str(n), []).append(out)
            print(
                f"[bench] round {r + 1}: {n} worker(s): "
                f"{statistics.median(rate) if rate else float('nan'):.2f} images/s, data wait "
                f"{100 * statistics.median(wait) if wait else float('nan'):.0f}%, "
                f"wall {out['wall_s']:.0f} s",
                flush=True,
            )
    return {
        "command": "train",
        "preset": args.preset,
        "data": data,
        "home": home,
        "max_steps": max_steps,
        "log_every": log_every,
        "workers": runs,
    }


def print_train(res: dict) -> None:
    print(
        f"\n{'workers':<9}{'images/s':>10}{'data wait':>11}{'wall s':>8}   (first interval excluded)"
    )
    for n, outs in res["workers"].items():
        for out in outs:
            rate, wait = out["images_per_s"], out["data_wait_fraction"]
            print(
                f"{n:<9}{rate['median'] if rate else float('nan'):>10.2f}"
                f"{100 * wait['median'] if wait else float('nan'):>10.0f}%{out['wall_s']:>8.0f}"
            )


# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.bench",
        description="Benchmark the train step, the data path, or short training runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step", help="the train step alone, per variant, on random inputs")
    step.add_argument("--preset", default="demo", help=f"one of {', '.join(C.PRESETS)}")
    step.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default all)")
    step.add_argument("--no-compile", action="store_true", help="leave out the compile variants")
    step.add_argument("--batch-size", type=int, help="images per domain (default: the preset's)")
    step.add_argument("--warmup", type=int, help="untimed steps per variant first")
    step.add_argument("--repeats", type=int, help="timed rounds over all variants")
    step.add_argument("--steps-per-repeat", type=int, help="steps per variant per round")
    step.add_argument("--threads", type=int, help="torch threads (default: the usable CPUs)")
    step.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    step.add_argument(
        "--quiet-below",
        type=float,
        default=0.15,
        help="a round counts as quiet when other processes took less than this share of the "
        "CPUs (default 0.15); quiet-round medians are reported too",
    )
    data = sub.add_parser("data", help="decode + augment images/s: Ray Data vs a DataLoader")
    data.add_argument("--load-size", type=int, default=286)
    data.add_argument("--crop-size", type=int, default=256)
    data.add_argument("--source-size", type=int, default=300, help="side of the stored JPEGs")
    data.add_argument("--images", type=int, default=256, help="JPEGs in the shards")
    data.add_argument("--root", help="where the shards go (default $CYCLEGAN_HOME/bench/...)")
    data.add_argument("--workers", default="1,2", help="CPUs per measurement, comma-separated")
    data.add_argument("--batch-size", type=int, default=16)
    data.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    data.add_argument("--warmup-batches", type=int, default=4)
    data.add_argument("--repeats", type=int, default=2, help="rounds over all measurements")
    train = sub.add_parser("train", help="short runs of pipeline.train, 1 and 2 workers")
    train.add_argument("--preset", default="demo", help="tiny or demo are a few minutes")
    train.add_argument("--max-steps", type=int, help="steps per run (default 200 tiny, 150 demo)")
    train.add_argument("--log-every", type=int, help="steps per metric interval")
    train.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    train.add_argument("--repeats", type=int, default=1)
    train.add_argument("--data", help="dataset root (default: the preset's, else written)")
    train.add_argument("--home", help="runs, MLflow store (default $CYCLEGAN_HOME/bench)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    for sp in (step, data, train):
        sp.add_argument("--json", metavar="FILE", help="write every number and the environment")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run, show = {
        "step": (bench_step, print_step),
        "data": (bench_data, print_data),
        "train": (bench_train, print_train),
    }[args.command]
    env = environment(getattr(args, "preset", None))
    try:
        result = run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    show(result)
    # Load averages before and after: how busy the machine was around the measurements.
    result["env"] = {**env, "loadavg_at_end": os.getloadavg()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
