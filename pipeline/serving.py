"""Serve trained generators over HTTP with Ray Serve: the settings, request checks, the batched
forward pass, the replica (a Serve deployment), the page, and the app builder.

One application, ``cyclegan``, holds one deployment, ``GeneratorServer``. Each replica loads the
generators once (one GPU per replica where the cluster has GPUs) and answers:

- ``POST /translate/{AtoB|BtoA}``: the body is an image (JPEG, PNG, WebP; BMP, TIFF and GIF are
  read too), the answer the translated image in the same format (PNG for the others). Query:
  ``size=N`` scales the shorter side to N first (as ``translate --load-size``), ``format=png``
  (or jpeg, webp) picks the output format;
- ``GET /healthz``, ``GET /info`` (model source, architecture, directions, training run, MLflow
  link), ``GET /stats`` (this replica: batch sizes served, memory) and ``GET /`` (a page to try
  it in a browser).

Requests are decoded and checked on their own (a bad one gets a 4xx naming what is wrong and
never reaches the generator), then batched with ``serve.batch``: a batch's images are grouped by
direction and size after resizing, one forward pass per group. Preprocessing is translate's
(``pipeline.translation``): safe decode, bicubic resize of the shorter side, [-1, 1] floats,
padding to a multiple of 4 inside the generator; the same image gives the same output.

The model source is resolved once, on the driver (:func:`resolve_settings`): an MLflow alias is
pinned to the version it names now and a run name to its newest checkpoint, so every replica of
one deployment serves the same weights, and deploying again after the alias moved (``serve.run``
with the same app name, ``python -m pipeline.serve --detach``, ``serve deploy``) rolls the
replicas over to the new version while requests keep being answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.models import DIRECTIONS, is_mlflow_uri
from pipeline.serving_page import page_html
from pipeline.serving_requests import (
    CONTENT_TYPES,
    Prepared,
    RequestError,
    check_direction,
    encode,
    group_by_size,
    prepare,
    translate_prepared,
)

APP_NAME = "cyclegan"
DEPLOYMENT_NAME = "GeneratorServer"
DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest image accepted, before and after ``size`` (a 256 px generator at 16 MP needs a few
GB of activations per image)."""
MAX_BODY_BYTES = 64 * 1024 * 1024
DIRECTION_CHOICES = (*DIRECTIONS, "both")


@dataclass(frozen=True)
class ServeSettings:
    """Everything a replica needs, resolved on the driver (plain values: it travels as the
    deployment's init argument)."""

    source: str
    """The model source as the user gave it (shown in /info)."""
    pinned: str
    """The source replicas load: an alias pinned to its version, a run to its checkpoint."""
    directions: tuple[str, ...]
    """Directions to load: AtoB, BtoA or both (a source with one generator has only the first)."""
    storage: str | None = None
    """Where run names live (default ``$CYCLEGAN_HOME/checkpoints``)."""
    tracking_uri: str | None = None
    """The MLflow tracking store of an MLflow source."""
    arch: dict | None = None
    """Architecture of an official .pth (ModelConfig fields), None to read it from the weights."""
    trust_pickle: bool = False
    """Load an MLflow model saved with pickle."""
    mlflow_link: str | None = None
    """Where the training run is shown in MLflow, when known."""
    max_batch_size: int = 8
    """Requests per batched call on a replica (1: no batching)."""
    batch_wait_ms: float = 10.0
    """How long a replica waits for a batch to fill."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest image accepted (width x height), as sent and after ``size``."""
    max_replicas: int = 1
    """Autoscaling's upper bound (it scales on requests queued per replica)."""

    def __post_init__(self) -> None:
        if not self.directions or any(d not in DIRECTIONS for d in self.directions):
            raise ValueError(f"directions: {self.directions!r}, expected AtoB and/or BtoA")
        if self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size: must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"--batch-wait-ms: must be >= 0, got {self.batch_wait_ms:g}")
        if self.max_pixels < 16:
            raise ValueError(f"--max-pixels: must be >= 16, got {self.max_pixels}")
        if self.max_replicas < 1:
            raise ValueError(f"--max-replicas: must be >= 1, got {self.max_replicas}")


# what a replica does, without Ray


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str


def json_reply(value: dict, status: int = 200) -> Reply:
    return Reply(status, json.dumps(value, indent=1).encode(), "application/json")


def error_reply(status: int, message: str) -> Reply:
    return json_reply({"error": message, "status": status}, status)


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class GeneratorService:
    """The generators of one replica and what it answers, kept apart from Ray so it can be
    tested in one process."""

    def __init__(self, nets: dict, cfgs: dict, info: dict, settings: ServeSettings) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.nets = {d: net.to(self.device).eval() for d, net in nets.items()}
        self.directions = tuple(d for d in DIRECTIONS if d in self.nets)
        self.settings = settings
        self.info = {
            "source": settings.source,
            "loaded": settings.pinned,
            "kind": info.get("kind"),
            "directions": list(self.directions),
            "architecture": {d: dataclasses.asdict(cfgs[d]) for d in self.directions},
            "step": info.get("step"),
            "mlflow_run_id": info.get("mlflow_run_id"),
            "mlflow_link": settings.mlflow_link,
            "device": str(self.device),
            "max_batch_size": settings.max_batch_size,
            "batch_wait_ms": settings.batch_wait_ms,
            "max_pixels": settings.max_pixels,
        }
        self.batch_sizes: Counter[int] = Counter()
        self.forwards = 0
        self.requests = 0
        self.errors: Counter[int] = Counter()
        self.rss_start = _rss_bytes()

    def prepare(self, direction: str, body: bytes, query: Mapping[str, str]) -> Prepared:
        return prepare(direction, body, query, self.directions, self.settings.max_pixels)

    def translate(self, items: list[Prepared]) -> list[np.ndarray]:
        self.batch_sizes[len(items)] += 1
        self.forwards += len(group_by_size(items))
        return translate_prepared(self.nets, items, self.device)

    def stats(self) -> dict:
        return {
            "pid": os.getpid(),
            "requests": self.requests,
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "forwards": self.forwards,
            "rss_start_bytes": self.rss_start,
            "rss_bytes": _rss_bytes(),
        }

    def route(self, method: str, path: str) -> tuple[str, str | None]:
        """(what, direction) of a request; RequestError for an unknown path or method."""
        parts = [p for p in path.split("/") if p]
        pages = {(): "page", ("healthz",): "healthz", ("info",): "info", ("stats",): "stats"}
        if tuple(parts) in pages:
            if method not in ("GET", "HEAD"):
                raise RequestError(405, f"{method} /{'/'.join(parts)}: use GET")
            return pages[tuple(parts)], None
        if len(parts) == 2 and parts[0] == "translate":
            if method != "POST":
                raise RequestError(405, f"{method} {path}: use POST with the image as the body")
            return "translate", parts[1]
        raise RequestError(
            404,
            f"no such path {path!r}: POST /translate/{{AtoB|BtoA}}, GET /healthz /info /stats /",
        )

    def answer(self, what: str) -> Reply:
        """The answer of a GET endpoint."""
        if what == "healthz":
            return Reply(200, b"ok\n", "text/plain")
        if what == "info":
            return json_reply(self.info)
        if what == "stats":
            return json_reply(self.stats())
        return Reply(200, page_html(self.directions).encode(), "text/html; charset=utf-8")


# the replica


class GeneratorServer:
    """A Serve replica: loads the generators of ``settings`` and answers HTTP requests; the
    translate requests it receives meanwhile are batched (``serve.batch``)."""

    def __init__(self, settings: dict) -> None:
        from ray import serve

        from pipeline.models import load_generators

        # Torch takes its thread count from OMP_NUM_THREADS, which Ray sets to the replica's CPUs.
        cfg = ServeSettings(**{**settings, "directions": tuple(settings["directions"])})
        nets, cfgs, info = load_generators(
            cfg.pinned,
            cfg.directions,
            storage=cfg.storage,
            arch=_model_config(cfg.arch),
            tracking_uri=cfg.tracking_uri,
            trust_pickle=cfg.trust_pickle,
        )
        self.service = GeneratorService(nets, cfgs, info, cfg)
        # Batching is set up per replica, from the settings (a plain function, not a method,
        # so the sizes can come from the deployment's argument).
        self._batched = serve.batch(
            max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_ms / 1000
        )(self._translate_batch)

    async def _translate_batch(self, items: list[Prepared]) -> list[tuple[bool, object]]:
        try:
            outputs = await asyncio.to_thread(self.service.translate, items)
        except Exception as exc:  # the whole batch fails; each caller answers 500
            return [(False, exc)] * len(items)
        return [(True, pixels) for pixels in outputs]

    async def handle(self, method: str, path: str, query: Mapping[str, str], body) -> Reply:
        """Answer one request; ``body`` is an async callable that reads the body."""
        service = self.service
        service.requests += 1
        try:
            what, direction = service.route(method, path)
            if what != "translate":
                return service.answer(what)
            check_direction(direction, service.directions)  # before reading a body for nothing
            data = await body()
            item = await asyncio.to_thread(service.prepare, direction, data, query)
            ok, result = await self._batched(item)
            if not ok:
                service.errors[500] += 1
                return error_reply(500, f"translation failed: {result}")
            out = await asyncio.to_thread(encode, result, item.format)
            return Reply(200, out, CONTENT_TYPES[item.format])
        except RequestError as exc:
            service.errors[exc.status] += 1
            return error_reply(exc.status, exc.message)

    async def __call__(self, request):
        from starlette.responses import Response

        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"

        async def body() -> bytes:
            return await read_body(request)

        reply = await self.handle(request.method, path, dict(request.query_params), body)
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type)

    def check_health(self) -> None:
        """Serve's health check: the generators are loaded (a failing check restarts it)."""
        if not self.service.nets:
            raise RuntimeError("no generator loaded")


async def read_body(request) -> bytes:
    """The request body, refused with 413 past MAX_BODY_BYTES (before reading it all)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"body of {declared} bytes: the limit is {MAX_BODY_BYTES}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise RequestError(413, f"body over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _model_config(arch: dict | None):
    from cyclegan.config import ModelConfig

    return ModelConfig(**arch) if arch else None


# the driver


def pin_source(source: str, tracking_uri: str | None) -> str:
    """``models:/NAME@alias`` as ``models:/NAME/VERSION`` of the version it names now; other
    sources as they are (a stored run is pinned by :func:`resolve_settings`)."""
    if not source.startswith("models:/"):
        return source
    name = source.split(":/", 1)[1].strip("/")
    if "@" not in name:
        return source
    from mlflow import MlflowClient

    from pipeline.config import default_tracking_uri
    from pipeline.models import ModelSourceError

    model, alias = name.split("@", 1)
    uri = tracking_uri or default_tracking_uri()
    try:
        version = MlflowClient(tracking_uri=uri).get_model_version_by_alias(model, alias).version
    except Exception as exc:
        raise ModelSourceError(
            f"model source {source}: not found in MLflow at {uri}: {exc}"
        ) from None
    return f"models:/{model}/{version}"


def _mlflow_link(run_id: str | None, tracking_uri: str) -> str | None:
    if not run_id:
        return None
    try:
        from mlflow import MlflowClient

        from pipeline.console import mlflow_link

        experiment = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # a checkpoint from another store: the run id is still shown
        return None
    return mlflow_link(tracking_uri, experiment, run_id)


def resolve_settings(
    source: str,
    direction: str = "both",
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    arch=None,
    trust_pickle: bool = False,
    **limits,
) -> ServeSettings:
    """Resolve ``source`` once (it is loaded here, so a bad source fails before anything is
    deployed); ``limits`` are the other ServeSettings fields (max_batch_size, ...)."""
    from pipeline.config import default_tracking_uri
    from pipeline.models import load_generators

    if direction not in DIRECTION_CHOICES:
        raise ValueError(f"--direction: {direction!r} is not one of {', '.join(DIRECTION_CHOICES)}")
    directions = DIRECTIONS if direction == "both" else (direction,)
    tracking = tracking_uri or default_tracking_uri()
    pinned = pin_source(str(source), tracking)
    loader = dict(storage=storage, arch=arch, tracking_uri=tracking, trust_pickle=trust_pickle)
    if is_mlflow_uri(pinned) and len(directions) == 1:
        from pipeline.models import load_generator

        net, cfg, info = load_generator(pinned, directions[0], **loader)
        nets = {directions[0]: net}
    else:
        nets, _, info = load_generators(pinned, directions, **loader)
    if not is_mlflow_uri(pinned):
        pinned = info["path"]  # the checkpoint file itself, not the run's newest at load time
    return ServeSettings(
        source=str(source),
        pinned=pinned,
        directions=tuple(d for d in directions if d in nets),
        storage=storage,
        tracking_uri=tracking,
        arch=dataclasses.asdict(arch) if arch is not None else None,
        trust_pickle=trust_pickle,
        mlflow_link=_mlflow_link(info.get("mlflow_run_id"), tracking),
        **limits,
    )


def application(settings: ServeSettings):
    """The Serve application of ``settings``: one GPU per replica where the cluster has GPUs,
    one CPU otherwise; autoscaling on the requests queued per replica.

    A redeploy starts each new replica beside the old one, which serves until its replacement
    is ready, when the cluster has room for one more replica now; without room (one GPU, in
    use) the old one is stopped first and requests wait for the new one meanwhile."""
    import ray
    from ray import serve

    resources = ray.cluster_resources() if ray.is_initialized() else {}
    unit = "GPU" if resources.get("GPU", 0) else "CPU"
    room = ray.is_initialized() and ray.available_resources().get(unit, 0) >= 1
    batch = settings.max_batch_size
    deployment = serve.deployment(GeneratorServer).options(
        name=DEPLOYMENT_NAME,
        ray_actor_options={"num_cpus": 1, "num_gpus": 1 if unit == "GPU" else 0},
        # One batch running and one filling; more wait in the proxy and count for autoscaling.
        max_ongoing_requests=2 * batch,
        autoscaling_config={
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": batch,
        },
        max_surge_percent=100 if room else 0,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=30,
    )
    return deployment.bind(dataclasses.asdict(settings))


def build_app(args: dict):
    """The builder for ``serve run pipeline.serving:build_app model=SOURCE [direction=both]
    [max_batch_size=8] [batch_wait_ms=10] [max_pixels=N] [max_replicas=N] [storage=URI]
    [trust_pickle=true]`` and for the ``import_path`` of a ``serve deploy`` config."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("serve: the app needs model=SOURCE (a run name, checkpoint or MLflow URI)")
    kinds = {"max_batch_size": int, "batch_wait_ms": float, "max_pixels": int, "max_replicas": int}
    known = {"model", "direction", "storage", "tracking_uri", "trust_pickle", *kinds}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"serve: unknown argument(s) {', '.join(unknown)}; known: {sorted(known)}")
    limits = {k: kind(args[k]) for k, kind in kinds.items() if k in args}
    settings = resolve_settings(
        str(args["model"]),
        str(args.get("direction", "both")),
        storage=args.get("storage"),
        tracking_uri=args.get("tracking_uri"),
        trust_pickle=str(args.get("trust_pickle", "false")).lower() in ("1", "true", "yes"),
        **limits,
    )
    return application(settings)


def run(settings: ServeSettings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """Deploy (or redeploy: same app name, replicas rolled over) on the connected Ray cluster;
    returns the URL once a replica answers. Serve's HTTP host and port are set when Serve first
    starts on a cluster and kept until ``serve.shutdown()``."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(application(settings), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Remove the application where Serve runs (Serve itself keeps running)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    # Serve never started here (a deploy interrupted early): there is no app to remove.
    with contextlib.suppress(RayServeException):
        serve.delete(APP_NAME)


def wait_forever() -> None:
    while True:
        time.sleep(3600)
