"""Load test of the generator server: a fixed number of 256 px requests from a few concurrent
clients, throughput and p50/p99 latency, and the replica's memory before and after.

    python -m pipeline.bench.serve_load --model h2z-try3          # deploys it twice: batching
                                                                   # on, then off (max batch 1)
    python -m pipeline.bench.serve_load --url http://127.0.0.1:8000 --requests 64 --clients 8

With ``--model`` the server is deployed here (on ``$RAY_ADDRESS``, the cluster ``ray start``
runs on this machine, or a private Ray) once with ``--max-batch-size`` and once with batching
off, and removed at the end. With ``--url`` one pass goes to a server already running, with
whatever batching it has. Each pass first sends a few warm-up requests, then ``--requests``
JPEG images of 256 x 256 px from ``--clients`` threads, each sending its next request when the
last one was answered. The replica's RSS comes from its ``/stats`` (the replica that answered
it: run with one replica to follow one process); it should stay flat from start to end.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

SIZE = 256
WARMUP = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.bench.serve_load",
        description="Load-test the generator server: throughput, p50/p99 latency, memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="deploy this source twice (batching on, then off)")
    target.add_argument("--url", help="a running server (one pass)")
    p.add_argument("--direction", default="AtoB", choices=("AtoB", "BtoA"))
    p.add_argument("--requests", type=int, default=32, help="requests per pass (default 32)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--max-batch-size", type=int, default=8, help="the batching pass (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="default 20")
    p.add_argument("--port", type=int, default=8000, help="with --model (default 8000)")
    p.add_argument("--address", help="Ray cluster address, with --model")
    return p


def request_body(seed: int) -> bytes:
    """A 256 px JPEG: smooth gradients plus noise, so it compresses like a photo."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, SIZE)
    base = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 128,
                     np.full((SIZE, SIZE), rng.uniform(0, 255))], axis=-1)  # fmt: skip
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=300) as res:
            res.read()
            return res.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as res:
        return json.loads(res.read())


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, by linear interpolation."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def run_pass(url: str, direction: str, requests: int, clients: int) -> dict:
    """Send ``requests`` images from ``clients`` threads; latencies, throughput and memory."""
    bodies = [request_body(i) for i in range(min(requests, 16))]
    endpoint = f"{url.rstrip('/')}/translate/{direction}"

    def timed(i: int) -> tuple[int, float]:
        started = time.perf_counter()
        return _post(endpoint, bodies[i % len(bodies)]), time.perf_counter() - started

    with ThreadPoolExecutor(clients) as pool:
        # Concurrent warm-up rounds: the largest batches are allocated before the start.
        for _ in range(WARMUP):
            if any(status != 200 for status, _ in pool.map(timed, range(clients))):
                raise RuntimeError(f"{endpoint}: the warm-up requests failed")
        before = _get_json(url.rstrip("/") + "/stats")
        started = time.perf_counter()
        answers = list(pool.map(timed, range(requests)))
    seconds = time.perf_counter() - started
    latencies = [took for _, took in answers]
    after = _get_json(url.rstrip("/") + "/stats")
    batches = {
        k: v - before["batch_sizes"].get(k, 0)
        for k, v in after["batch_sizes"].items()
        if v - before["batch_sizes"].get(k, 0)
    }
    return {
        "requests": requests,
        "clients": clients,
        "failed": sum(status != 200 for status, _ in answers),
        "seconds": round(seconds, 2),
        "images_per_s": round(requests / seconds, 3),
        "p50_ms": round(1000 * percentile(latencies, 0.5), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "rss_start_mib": round(before["rss_bytes"] / 2**20, 1),
        "rss_end_mib": round(after["rss_bytes"] / 2**20, 1),
        "batch_sizes": batches,
    }


def print_results(results: list[dict]) -> None:
    print("| max batch | requests x clients | images/s | p50 ms | p99 ms | RSS start -> end MiB "
          "| batches (size: count) | failed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        batches = ", ".join(
            f"{k}: {v}" for k, v in sorted(r["batch_sizes"].items(), key=lambda x: int(x[0]))
        )
        print(f"| {r['max_batch_size']} | {r['requests']} x {r['clients']} | {r['images_per_s']:.2f} "
              f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['rss_start_mib']:.0f} -> "
              f"{r['rss_end_mib']:.0f} | {batches} | {r['failed']} |", flush=True)  # fmt: skip


def _deployed_passes(args: argparse.Namespace) -> list[dict]:
    """Deploy ``--model`` with batching on, then off; one pass each."""
    import ray

    from pipeline import ray_cluster, serving
    from pipeline.config import Config

    started_here = ray_cluster.connect(Config(), address=args.address)
    results = []
    try:
        for batch in (args.max_batch_size, 1):
            settings = serving.resolve_settings(
                args.model, args.direction, max_batch_size=batch,
                batch_wait_ms=args.batch_wait_ms, max_replicas=1,
            )  # fmt: skip
            url = serving.run(settings, serving.DEFAULT_HOST, args.port)
            while _get_json(url + "/info")["max_batch_size"] != batch:
                time.sleep(0.5)  # the old replica drains
            print(f"[serve_load] max batch {batch}: {args.requests} requests", flush=True)
            results.append({"max_batch_size": batch, **run_pass(url, args.direction,
                                                                args.requests, args.clients)})  # fmt: skip
        serving.stop()
    finally:
        if started_here:
            ray.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests < 1 or args.clients < 1:
        print("error: --requests and --clients must be >= 1", file=sys.stderr)
        return 2
    if args.model:
        results = _deployed_passes(args)
    else:
        info = _get_json(args.url.rstrip("/") + "/info")
        one = run_pass(args.url, args.direction, args.requests, args.clients)
        results = [{"max_batch_size": info["max_batch_size"], **one}]
    print_results(results)
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
