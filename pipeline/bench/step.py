"""The train step alone, per variant (fp32, bf16, channels_last, torch.compile, CUDA graphs, a
bigger batch), each in its own process and timed in turn."""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import time
import traceback
from dataclasses import dataclass

import torch

from pipeline import config as C
from pipeline.allocator import MALLOC_KEEP_ENV
from pipeline.bench.common import (
    cpu_busy_seconds,
    gpu_peak_tflops,
    release_free_memory,
    status_kib,
    summarize,
)

# (warm-up steps, timed rounds, steps per round) per preset: a few minutes on 2 CPU cores.
STEP_REPEATS = {"tiny": (1, 3, 5), "demo": (2, 7, 5), "paper128": (1, 5, 2), "paper": (1, 5, 2)}
COMPILE_WARMUP = 6  # G and D see two batch shapes and two requires_grad states: recompiles


@dataclass(frozen=True)
class Variant:
    """How the nets run: autocast dtype, memory format, torch.compile and its mode, and the
    batch when the variant has one of its own."""

    name: str
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    """torch.compile's mode: None (default), reduce-overhead (CUDA graphs), max-autotune (Triton
    kernel search, then CUDA graphs)."""
    batch_size: int | None = None
    """Images per domain for this variant (None: the run's batch)."""
    official: bool = False
    """The official implementation's iteration (``bench/official.py``) instead of ours."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment variables of the variant's process (OpenMP's, the allocator's), set before
    torch loads there."""


# On a GPU a paper-sized step at batch 1 is short next to the launch of its hundreds of kernels:
# CUDA graphs replay them with one launch, and a bigger batch gives each kernel enough blocks to
# fill the GPU. Memory: one generator pass saves 474 MiB of fp32 activations per 256 px image for
# its backward (counted with saved-tensor hooks; about half that under bf16 autocast) and a step
# makes six passes per image pair, so batch 16 holds about 23 GiB: the whole GPU_VARIANTS run,
# two such processes beside five of batch 1, should stay near 65 GiB.
BIG_BATCH = 16

# OpenMP's threads pinned, one to a core: none of them moves while the others wait for it.
OMP_BIND = (("OMP_PROC_BIND", "close"), ("OMP_PLACES", "cores"))

# fmt: off
VARIANTS = {
    v.name: v
    for v in (
        Variant("official", official=True),
        Variant("fp32"),
        # OpenMP's idle threads sleep at once instead of spinning for a while: what a shared
        # machine would want, at the cost of a wake-up at every barrier.
        Variant("fp32_omp_passive", env=(("OMP_WAIT_POLICY", "PASSIVE"),)),
        Variant("fp32_omp_bind", env=OMP_BIND),
        Variant("fp32_malloc_keep", env=MALLOC_KEEP_ENV),
        Variant("bf16", bf16=True),
        Variant("channels_last", channels_last=True),
        Variant("bf16_channels_last", bf16=True, channels_last=True),
        Variant("compile", compile=True),
        Variant("compile_cl", channels_last=True, compile=True),
        Variant("compile_cl_omp_bind", channels_last=True, compile=True, env=OMP_BIND),
        Variant("compile_cl_autotune", channels_last=True, compile=True,
                compile_mode="max-autotune"),
        Variant("compile_bf16", bf16=True, compile=True),
        Variant("compile_bf16_cl", bf16=True, channels_last=True, compile=True),
        Variant("cudagraphs_bf16_cl", bf16=True, channels_last=True, compile=True,
                compile_mode="reduce-overhead"),
        Variant(f"bf16_cl_batch{BIG_BATCH}", bf16=True, channels_last=True, batch_size=BIG_BATCH),
        Variant(f"compile_bf16_cl_batch{BIG_BATCH}", bf16=True, channels_last=True, compile=True,
                batch_size=BIG_BATCH),
        Variant(f"autotune_bf16_cl_batch{BIG_BATCH}", bf16=True, channels_last=True, compile=True,
                compile_mode="max-autotune", batch_size=BIG_BATCH),
    )
}
# fmt: on
DEFAULT_VARIANTS = (
    "official",
    "fp32",
    "bf16",
    "channels_last",
    "bf16_channels_last",
    "compile",
    "compile_bf16",
)
"""What ``step`` runs without ``--variants``: the official iteration, then the choices of
train.precision, channels_last and compile as a training run has them."""
GPU_VARIANTS = (
    "fp32",
    "bf16",
    "bf16_channels_last",
    "compile_bf16_cl",
    "cudagraphs_bf16_cl",
    f"bf16_cl_batch{BIG_BATCH}",
    f"compile_bf16_cl_batch{BIG_BATCH}",
)
"""What ``python -m pipeline.bench gpu`` runs: each CUDA speed-up added one at a time, so each
one's share shows (max-autotune is left out: its kernel search takes minutes)."""


# step: one variant's nets, stepped on demand


class StepRunner:
    """Nets, optimizers, pools and random inputs of one variant; ``run(n)`` times n steps."""

    def __init__(self, cfg: C.Config, batch_size: int, variant: Variant, device: str, seed: int):
        from cyclegan.train_step import build_nets, build_optimizers, build_pools

        self.cfg, self.variant, self.device = cfg, variant, torch.device(device)
        batch_size = variant.batch_size or batch_size
        torch.manual_seed(seed)
        nets = build_nets(cfg.model)
        fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
        for _, net in nets.items():
            net.to(self.device, memory_format=fmt)
        self.opts = build_optimizers(nets, cfg.optim, fused=self.device.type == "cuda" or None)
        if variant.compile:
            for name, net in nets.items():
                setattr(nets, name, torch.compile(net, mode=variant.compile_mode))
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
        if self.variant.official:
            from pipeline.bench.official import official_step

            return official_step(self.nets, self.opts, self.pools, real_A, real_B, self.cfg.loss)
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
        out = {"peak_rss_mib": status_kib("VmHWM") / 1024}
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
    # Every step has the same shapes: cuDNN times its algorithms once per shape and keeps the
    # fastest (this process is the variant's own, so the setting reaches nothing else).
    torch.backends.cudnn.benchmark = spec["device"] == "cuda"
    base_rss = status_kib("VmRSS") / 1024
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
        release_free_memory()


class VariantProcess:
    """The parent's handle on one variant's process."""

    def __init__(self, ctx, spec: dict):
        self.name = spec["variant"]
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_step_process, args=(child, spec))
        # A spawned process takes the environment at its start: the variant's own variables.
        env = dict(VARIANTS[self.name].env)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
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
    # Long on purpose: the variants are measured interleaved in one loop, so their numbers are side by side.
    cfg = C.preset(args.preset)
    batch = args.batch_size or cfg.data.batch_size
    warmup, repeats, per_round = STEP_REPEATS.get(args.preset, (1, 5, 2))
    warmup = args.warmup if args.warmup is not None else warmup
    repeats = args.repeats or repeats
    per_round = args.steps_per_repeat or per_round
    names = [n.strip() for n in args.variants.split(",")] if args.variants else DEFAULT_VARIANTS
    unknown = [n for n in names if n not in VARIANTS]
    names = [n for n in names if not (args.no_compile and n in VARIANTS and VARIANTS[n].compile)]
    if unknown or not names:
        raise ValueError(f"--variants: {unknown or 'none'}; choose from {', '.join(VARIANTS)}")
    batches = {name: VARIANTS[name].batch_size or batch for name in names}
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
    # Counted once, at one variant's batch: every conv's FLOPs are linear in the batch.
    flops_per_image = None
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                procs[name] = VariantProcess(ctx, {**spec, "variant": name})
                if flops_per_image is None and not VARIANTS[name].compile:
                    # One real step: counts as warm-up too.
                    flops_per_image = procs[name].call("flops") / batches[name]
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
        if flops_per_image is None:
            counter = VariantProcess(ctx, {**spec, "variant": "fp32"})
            try:
                flops_per_image = counter.call("flops") / batch
            finally:
                counter.close()
        print(
            f"[bench] {flops_per_image * batch / 1e9:.3f} GFLOP per step of batch {batch} "
            "(forward + backward)",
            flush=True,
        )
        times: dict[str, list[float]] = {name: [] for name in procs}
        # The share of the machine's CPU time that other processes took while a variant ran:
        # the machine may be shared, and contention slows multi-threaded steps a lot.
        others: dict[str, list[float]] = {name: [] for name in procs}
        for r in range(repeats):
            for name, proc in list(procs.items()):
                busy0, total0 = cpu_busy_seconds()
                try:
                    wall, cpu = proc.call("run", per_round)
                except RuntimeError as exc:  # e.g. out of GPU memory: the others go on
                    results[name] = {"ok": False, "error": str(exc)}
                    procs.pop(name).close()
                    del times[name], others[name]
                    print(f"[bench] {name}: FAILED: {_last_line(str(exc))}", flush=True)
                    continue
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
        res, n = results[name], batches[name]
        flops = flops_per_image * n
        res["batch_size"] = n
        res["flops_per_step"] = round(flops)
        res["ms_per_step"] = summarize([1e3 * s for s in step_s])
        res["images_per_s"] = summarize([n / s for s in step_s])
        res["others_cpu_share"] = summarize(others[name])
        median_s = statistics.median(step_s)
        res["achieved_gflop_per_s"] = flops / median_s / 1e9
        res["achieved_tflop_per_s"] = flops / median_s / 1e12
        res["fraction_of_peak"] = flops / median_s / (peak * 1e12) if peak else None
        # Quiet rounds: other processes took less than --quiet-below of the CPUs meanwhile.
        quiet = [r for r, share in enumerate(others[name]) if share < args.quiet_below]
        res["quiet_rounds"] = quiet
        res["ms_per_step_quiet"] = summarize([1e3 * step_s[r] for r in quiet]) if quiet else None
        for base in ("fp32", "official"):
            if base not in times:
                continue
            # Per image, so that a variant with a batch of its own compares fairly.
            ratios = [
                (f / batches[base]) / (s / n) for f, s in zip(times[base], step_s, strict=True)
            ]
            res[f"speedup_vs_{base}"] = summarize(ratios)
            both = [r for r in quiet if others[base][r] < args.quiet_below]
            res[f"speedup_vs_{base}_quiet"] = summarize([ratios[r] for r in both]) if both else None
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
        "gpu": gpu,
        "threads": threads,
        "cudnn_benchmark": device == "cuda",
        "warmup": warmup,
        "repeats": repeats,
        "steps_per_repeat": per_round,
        "flops_per_image": flops_per_image,
        "flops_per_step": round(flops_per_image * batch),
        "gpu_bf16_peak_tflops": peak,
        "quiet_below": args.quiet_below,
        "variants": results,
    }


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def print_step(res: dict) -> None:
    peak = res["gpu_bf16_peak_tflops"]
    print(
        f"\n{'':<26}{'all rounds':-^48}  {'quiet rounds':-^25}\n"
        f"{'variant':<26}{'batch':>6}{'img/s':>9}  {'ms/step median [min-max]':<25}"
        f"{'vs fp32':>8}  {'ms/step (n)':<15}{'vs fp32':>8}  {'others':>6}{'peak MiB':>9}"
        f"{'GFLOP/step':>11}{'TFLOP/s':>9}" + ("  % of bf16 peak" if peak else "")
    )
    best = None
    for name, v in res["variants"].items():
        if not v["ok"]:
            print(f"{name:<26}FAILED: {_last_line(v['error'])}")
            continue
        ms, speed = v["ms_per_step"], v.get("speedup_vs_fp32")
        qms, qspeed = v["ms_per_step_quiet"], v.get("speedup_vs_fp32_quiet")
        mem = v.get("cuda_max_allocated_mib", v["peak_rss_mib"])
        spread = f"{ms['median']:.1f} [{ms['min']:.1f}-{ms['max']:.1f}]"
        quiet = f"{qms['median']:.1f} ({qms['n']})" if qms else "-"
        line = (
            f"{name:<26}{v['batch_size']:>6}{v['images_per_s']['median']:>9.2f}  {spread:<25}"
            f"{_ratio(speed):>8}  {quiet:<15}{_ratio(qspeed):>8}"
            f"  {100 * v['others_cpu_share']['median']:>5.0f}%{mem:>9.0f}"
            f"{v['flops_per_step'] / 1e9:>11.2f}{v['achieved_tflop_per_s']:>9.3f}"
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
        "vs fp32: median of per-round ratios of images/s to fp32 eager; others: median share "
        "of the machine's CPU time other processes took while the variant ran; quiet rounds: "
        f"others below {100 * res['quiet_below']:.0f}%; peak MiB: "
        + (
            "resident-set high-water mark of the variant's own process (torch included)"
            if res["device"] == "cpu"
            else "torch.cuda.max_memory_allocated"
        )
    )
    if best:
        print(f"fastest: {best[0]}, {best[1]:.2f}x fp32 eager")
    official = {name: v.get("speedup_vs_official_quiet") or v.get("speedup_vs_official")
                for name, v in res["variants"].items() if v["ok"] and name != "official"}  # fmt: skip
    if any(official.values()):
        print("vs the official iteration (images/s ratio, median of rounds): " + ", ".join(
            f"{name} {_ratio(speed)}" for name, speed in official.items() if speed))  # fmt: skip


def _ratio(stats: dict | None) -> str:
    return f"{stats['median']:.2f}x" if stats else "-"
