"""``translate`` against the generator's pure forward pass on the same machine.

The forward pass alone: the generator in this process on images already decoded, in batches of
``--batch-size``, with as many torch threads as torch takes by default (the machine's cores).
Then ``python -m pipeline.translate`` as a user runs it, on a private local Ray, over the same
images as JPEG files: its own rate (reading, decoding, the forward pass, encoding, writing,
over Ray Data) and the whole command's (Python, Ray's start, the model's load, shutdown).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

REPORTED = re.compile(r"\[translate\] (\d+) images -> .* in ([0-9.]+) s \(([0-9.]+) images/s")


def write_inputs(folder: str, count: int, size: int, seed: int = 0) -> list[str]:
    """``count`` smooth random JPEGs of ``size`` px (as photos compress, not as noise)."""
    import numpy as np
    import torch
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    names = [f"img{i:05d}.jpg" for i in range(count)]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    gen = torch.Generator().manual_seed(seed)
    for name in missing:
        small = torch.rand((1, 3, 8, 8), generator=gen)
        big = torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic")
        pixels = (big[0].permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(os.path.join(folder, name), quality=90)
    return [os.path.join(folder, n) for n in names]


def write_generator(path: str, preset: str):
    """A randomly initialised generator of ``preset``'s architecture, as an official-style
    ``.pth`` state dict (what ``--model FILE.pth`` reads, architecture from the weights)."""
    import torch

    from cyclegan.networks import build_generator
    from pipeline import config as C

    cfg = C.preset(preset).model
    torch.manual_seed(0)
    net = build_generator(cfg).eval()
    if not os.path.isfile(path):
        torch.save(net.state_dict(), path)
    return net


def forward_rate(net, paths: list[str], batch_size: int, rounds: int) -> dict:
    """images/s of the forward pass alone on decoded images, median over ``rounds``."""
    import numpy as np
    import torch
    from PIL import Image

    from cyclegan.transforms import to_input, to_uint8

    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[: batch_size * 4]]
    batches = [
        torch.from_numpy(np.stack(images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    rates = []
    with torch.no_grad():
        to_uint8(net(to_input(batches[0])))  # warm-up: oneDNN primitives for this shape
        for _ in range(rounds):
            t0 = time.perf_counter()
            for batch in batches:
                to_uint8(net(to_input(batch)))
            rates.append(len(images) / (time.perf_counter() - t0))
    return {"images_per_s": statistics.median(rates), "rounds": rates,
            "threads": torch.get_num_threads()}  # fmt: skip


def translate_run(model: str, folder: str, out: str, batch_size: int) -> dict:
    cmd = [
        sys.executable, "-m", "pipeline.translate", "--model", model, "--direction", "AtoB",
        "--input", folder, "--output", out, "--overwrite", "--address", "local",
        "--batch-size", str(batch_size),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
    wall = time.time() - t0
    match = REPORTED.search(res.stdout)
    if res.returncode != 0 or match is None:
        raise RuntimeError(f"pipeline.translate failed ({res.returncode}):\n{res.stderr[-3000:]}")
    images = int(match.group(1))
    return {"images": images, "seconds": float(match.group(2)),
            "images_per_s": float(match.group(3)), "wall_s": wall,
            "wall_images_per_s": images / wall}  # fmt: skip


def bench_translate(args: argparse.Namespace) -> dict:
    from pipeline import config as C

    home = args.home or os.path.join(C.home(), "bench")
    folder = os.path.join(home, "translate", f"inputs-{args.size}px")
    paths = write_inputs(folder, args.images, args.size)
    model = os.path.join(home, "translate", f"generator-{args.preset}.pth")
    net = write_generator(model, args.preset)
    forward = forward_rate(net, paths, args.batch_size, args.rounds)
    print(f"[bench] forward alone: {forward['images_per_s']:.2f} images/s "
          f"({forward['threads']} threads)", flush=True)  # fmt: skip
    out = os.path.join(home, "translate", "outputs")
    run = translate_run(model, folder, out, args.batch_size)
    set_up = run["wall_s"] - args.images / forward["images_per_s"]
    return {
        "command": "translate",
        "preset": args.preset,
        "size": args.size,
        "images": args.images,
        "batch_size": args.batch_size,
        "forward": forward,
        "translate": run,
        "ratio": run["images_per_s"] / forward["images_per_s"],
        "ratio_whole_command": run["wall_images_per_s"] / forward["images_per_s"],
        "set_up_s": set_up,
    }


def print_translate(res: dict) -> None:
    fwd, run = res["forward"]["images_per_s"], res["translate"]
    print(f"\n{res['images']} images of {res['size']} px, {res['preset']} generator, "
          f"batch {res['batch_size']}:")  # fmt: skip
    print(f"  forward pass alone       {fwd:8.2f} images/s")
    print(f"  translate (Ray Data)     {run['images_per_s']:8.2f} images/s  "
          f"ratio {res['ratio']:.2f}")  # fmt: skip
    print(f"  translate, whole command {run['wall_images_per_s']:8.2f} images/s  "
          f"ratio {res['ratio_whole_command']:.2f}, {run['wall_s']:.1f} s wall, "
          f"{res['set_up_s']:.1f} s beyond the forward passes")  # fmt: skip


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("translate", help="translate vs the generator's pure forward pass")
    p.add_argument("--preset", default="paper", help="the generator's architecture (paper)")
    p.add_argument("--images", type=int, default=1000, help="input images (default 1000)")
    p.add_argument("--size", type=int, default=256, help="their side in px (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="forward-pass rounds (default 3)")
    p.add_argument("--home", help="inputs, model, outputs (default $CYCLEGAN_HOME/bench)")
    return p
