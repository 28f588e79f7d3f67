"""Serve a trained generator over HTTP with Ray Serve (batched, autoscaled replicas).

    python -m pipeline.serve --model h2z-try3                          # both directions
    python -m pipeline.serve --model models:/h2z-AtoB@champion --direction AtoB --port 8000
    python -m pipeline.serve --model models:/h2z-AtoB@champion --detach  # (re)deploy, return
    curl --data-binary @horse.jpg -o zebra.jpg http://127.0.0.1:8000/translate/AtoB
    curl --data-binary @horse.png -o zebra.png 'http://127.0.0.1:8000/translate/AtoB?size=256'

``--model`` is anything ``translate`` takes (run name, checkpoint, ``runs:/``, ``models:/``,
official ``.pth``). It is loaded here first, so a bad source fails before anything is deployed;
an MLflow alias is pinned to the version it names now. The API: ``POST /translate/{AtoB|BtoA}``
(the image as the body; query ``size``, ``format``), ``GET /healthz``, ``/info``, ``/stats``,
and a page to try it at ``/``. Bad input gets a 4xx naming the problem.

Without ``--detach`` the command serves until Ctrl-C, then removes the app. With ``--detach``
it deploys into a running Ray cluster and returns, leaving the app up; running it again (say,
after the alias moved to a new version) rolls the replicas over to the new model while requests
keep being answered. The same app as a Serve config: ``serve deploy cluster/serve.yml``, or
``serve run pipeline.serving:build_app model=SOURCE``. Serve's host and port are fixed when
Serve first starts on a cluster (``serve shutdown`` to change them).
"""

from __future__ import annotations

import argparse

from pipeline import exit_with
from pipeline.flags import add_address_flag, add_model_flags, arch_from_flags, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.serve",
        description="Serve a generator over HTTP with Ray Serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_model_flags(p)
    p.add_argument("--direction", default="both", choices=("AtoB", "BtoA", "both"))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--max-batch-size", type=int, default=8, help="1 turns batching off")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="wait for a batch to fill")
    p.add_argument(
        "--max-pixels", type=int, default=4096 * 4096, help="largest image (width x height)"
    )
    p.add_argument("--max-replicas", type=int, help="autoscaling bound (default: GPUs, else 1)")
    p.add_argument("--detach", action="store_true", help="deploy into a running cluster, return")
    add_address_flag(p)
    return p


def _announce(settings, url: str) -> None:
    print(f"[serve] {settings.source} ({', '.join(settings.directions)}) at {url}/")
    print(f"[serve] try: curl --data-binary @photo.jpg -o out.jpg {url}/translate/"
          f"{settings.directions[0]}", flush=True)  # fmt: skip


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        import signal

        import ray

        from pipeline import ray_cluster, serving
        from pipeline.config import Config

        if args.detach and args.address == ray_cluster.LOCAL:
            raise ValueError("--detach: needs a running Ray cluster, not a private one")
        started_here = ray_cluster.connect(Config(), address=args.address)
        # ray.init puts its own SIGTERM handler in place (it aborts): SIGTERM is Ctrl-C again,
        # so the app is removed on the way out.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            if args.detach and started_here:
                raise ValueError(
                    "--detach: no Ray cluster is running (start one with `ray start --head`, "
                    "or pass --address)"
                )
            gpus = int(ray.cluster_resources().get("GPU", 0))
            settings = serving.resolve_settings(
                args.model,
                args.direction,
                storage=args.storage,
                arch=arch_from_flags(args),
                trust_pickle=args.trust_pickle,
                max_batch_size=args.max_batch_size,
                batch_wait_ms=args.batch_wait_ms,
                max_pixels=args.max_pixels,
                max_replicas=args.max_replicas or max(1, gpus),
            )
            if args.detach:
                _announce(settings, serving.run(settings, args.host, args.port))
                return 0
            try:
                _announce(settings, serving.run(settings, args.host, args.port))
                serving.wait_forever()
            finally:
                serving.stop()  # also when interrupted while deploying
        finally:
            if started_here:
                ray.shutdown()
        return 0

    return run_command(body, "serving")


if __name__ == "__main__":
    exit_with(main())
