"""Load trained generators from wherever they live: one function for every CLI that needs one.

A model source is one of:

- a run folder (``$STORAGE/NAME``: its ``checkpoint_*`` folder with the highest step is used),
  a ``checkpoint_*`` folder, or a ``checkpoint.pt`` file; local or ``s3://``/``gs://``;
- a run NAME, looked up under ``storage`` (default ``$CYCLEGAN_HOME/checkpoints``);
- an MLflow model URI: ``runs:/RUN_ID/generator_AtoB``, ``runs:/RUN_ID`` (the generator of the
  asked direction), ``models:/NAME@alias``, ``models:/NAME/VERSION`` or ``models:/m-...``: read
  from the weights and architecture files training logs with the model (see
  :func:`write_generator_files`); any other MLflow model would have to be unpickled, and is
  refused unless ``trust_pickle``;
- a generator file of the official repo (``latest_net_G_A.pth``, ``horse2zebra.pth``): its
  architecture is read from the weights unless ``arch`` gives it.

Training checkpoints hold both generators: G_A maps A to B (``AtoB``), G_B maps B to A
(``BtoA``). Every failure raises :class:`ModelSourceError` naming the source.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import sys
import tempfile

import pyarrow.fs as pafs
import torch
from torch import nn

from cyclegan.checkpoint import load_official_generator
from cyclegan.config import ModelConfig
from cyclegan.networks import ResnetGenerator
from pipeline import checkpoints, runs, storage
from pipeline.checkpoints import CHECKPOINT_FILE, CheckpointError
from pipeline.config import default_storage_uri, default_tracking_uri

DIRECTIONS = ("AtoB", "BtoA")
NET_OF_DIRECTION = {"AtoB": "G_A", "BtoA": "G_B"}
MLFLOW_MODEL_NAME = {"AtoB": "generator_AtoB", "BtoA": "generator_BtoA"}
_MLFLOW_NAME = re.compile(r"generator_(AtoB|BtoA)$")
# The files training logs in an MLflow model's extra_files/: the generator's state dict (read
# with weights_only=True) and its architecture as JSON, so that loading never unpickles.
WEIGHTS_FILE = "generator.pt"
ARCH_FILE = "generator.json"
ARCH_FORMAT = 1


class ModelSourceError(ValueError):
    """A model source that cannot be resolved or loaded; the message names it."""


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: {direction!r} is not one of {', '.join(DIRECTIONS)}")
    return direction


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(("runs:/", "models:/"))


# architecture


def _model_config(tree: dict) -> ModelConfig:
    """A ModelConfig from a saved config's ``model`` section (unknown keys ignored)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in tree.items() if k in known})


def infer_arch(state: dict[str, torch.Tensor]) -> ModelConfig:
    """The generator architecture that a ResnetGenerator state dict was saved from.

    ``model.1`` is the first 7x7 conv (ngf x input_nc), residual blocks hold ``conv_block``
    keys, the last conv gives output_nc; a batch-norm generator has ``model.2.weight`` (instance
    norm without affine parameters has none).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    first = state.get("model.1.weight")
    if first is None or first.dim() != 4:
        raise ValueError("not a ResnetGenerator state dict: no model.1.weight conv")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"model\.(\d+)\.conv_block\.", k))}
    convs = [
        (int(m.group(1)), v)
        for k, v in state.items()
        if (m := re.fullmatch(r"model\.(\d+)\.weight", k)) and v.dim() == 4
    ]
    last = max(convs, key=lambda item: item[0])[1]
    norm = "batch" if "model.2.weight" in state else "instance"
    return ModelConfig(
        input_nc=first.shape[1],
        output_nc=last.shape[0],
        ngf=first.shape[0],
        n_blocks=len(blocks),
        norm=norm,
    )


def arch_of(net: nn.Module) -> ModelConfig:
    """The architecture of a live generator (e.g. one loaded from MLflow)."""
    cfg = infer_arch(net.state_dict())
    if cfg.norm == "instance" and not any(isinstance(m, nn.InstanceNorm2d) for m in net.modules()):
        cfg = dataclasses.replace(cfg, norm="none")
    return cfg


def build_from_state(state: dict, cfg: ModelConfig, source: str) -> ResnetGenerator:
    net = ResnetGenerator(cfg.input_nc, cfg.output_nc, cfg.ngf, cfg.n_blocks, cfg.norm)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelSourceError(
            f"{source}: weights do not match a generator with {cfg}: {exc}"
        ) from None
    return net.eval()


# checkpoints on local or object storage


def _file_type(fs: pafs.FileSystem, path: str, where: str) -> pafs.FileType:
    try:
        return checkpoints.file_type(fs, path, where)
    except CheckpointError as exc:
        raise ModelSourceError(str(exc)) from None


def _skipped(where: str, exc: Exception) -> None:
    print(f"[model] {where} is unusable, trying an older checkpoint: {exc}", file=sys.stderr)


def _looks_like_name(source: str) -> bool:
    return bool(source) and "/" not in source and "\\" not in source and "://" not in source


def _resolve_path(source: str, storage_uri: str | None) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path, display URI) of an existing file or folder the source names."""
    try:
        fs, path = storage.resolve(source)
    except storage.StorageError as exc:
        raise ModelSourceError(f"model source {source}: {exc}") from None
    kind = _file_type(fs, path, source)
    if kind != pafs.FileType.NotFound:
        return fs, path, source
    if _looks_like_name(source):
        root = storage_uri or default_storage_uri()
        run_uri = storage.join(root, source)
        rfs, rpath = storage.resolve(run_uri)
        if _file_type(rfs, rpath, run_uri) == pafs.FileType.Directory:
            return rfs, rpath, run_uri
        names = runs.list_runs(root)
        raise ModelSourceError(
            f"model source {source!r}: no such file or folder, and no run called {source!r} under "
            f"{storage.redact(root)} (runs there: {', '.join(names) or 'none'})"
        )
    raise ModelSourceError(f"model source {storage.redact(source)}: no such file or folder")


def _checkpoint_info(ckpt: dict, where: str) -> dict:
    config = ckpt.get("config") or {}
    return {
        "kind": "checkpoint",
        "path": where,
        "step": int(ckpt["step"]) if "step" in ckpt else None,
        "mlflow_run_id": ckpt.get("mlflow_run_id"),
        "config": config,
        "crop_size": (config.get("data") or {}).get("crop_size"),
    }


def _from_checkpoint(ckpt: dict, directions: list[str], where: str) -> tuple[dict, dict, dict]:
    nets_state = ckpt.get("nets")
    if not isinstance(nets_state, dict):
        raise ModelSourceError(f"{where}: a checkpoint without 'nets'")
    try:
        cfg = _model_config((ckpt.get("config") or {}).get("model") or {})
    except ValueError as exc:
        raise ModelSourceError(f"{where}: bad model config in the checkpoint: {exc}") from None
    nets, cfgs = {}, {}
    for d in directions:
        name = NET_OF_DIRECTION[d]
        if name not in nets_state:
            raise ModelSourceError(f"{where}: the checkpoint has no {name} ({d}) generator")
        cfgs[d] = cfg if d == "AtoB" else cfg.reversed()
        nets[d] = build_from_state(nets_state[name], cfgs[d], f"{where} ({name})")
    return nets, cfgs, _checkpoint_info(ckpt, where)


def _is_official_state(state: object) -> bool:
    return (
        isinstance(state, dict)
        and bool(state)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
        and any(k.removeprefix("module.").startswith("model.") for k in state)
    )


def _from_official(
    fs: pafs.FileSystem, path: str, where: str, state: dict, arch: ModelConfig | None
) -> tuple[ResnetGenerator, ModelConfig]:
    try:
        cfg = arch or infer_arch(state)
    except ValueError as exc:
        raise ModelSourceError(f"{where}: {exc}") from None
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            return load_official_generator(path, cfg), cfg
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, posixpath.basename(path) or "generator.pth")
            torch.save(state, local)
            return load_official_generator(local, cfg), cfg
    except ValueError as exc:
        raise ModelSourceError(f"{where}: {exc}") from None


def _load_stored(
    source: str, directions: list[str], storage_uri: str | None, arch: ModelConfig | None
) -> tuple[dict, dict, dict]:
    fs, path, where = _resolve_path(source, storage_uri)
    try:
        if _file_type(fs, path, where) == pafs.FileType.Directory:
            direct = posixpath.join(path, CHECKPOINT_FILE)
            if _file_type(fs, direct, where) == pafs.FileType.File:
                path, where = direct, storage.join(where, CHECKPOINT_FILE)
                state = checkpoints.load(fs, path, where)
            else:
                path, state = checkpoints.newest_loadable(fs, path, where, on_skip=_skipped)
                where = storage.join(where, *path.split("/")[-2:])
        else:
            state = checkpoints.load(fs, path, where)
    except CheckpointError as exc:
        raise ModelSourceError(str(exc)) from None
    if isinstance(state, dict) and "nets" in state:
        return _from_checkpoint(state, directions, where)
    if _is_official_state(state):
        # One generator; the caller says which way it translates.
        net, cfg = _from_official(fs, path, where, state, arch)
        info = {"kind": "official", "path": where, "step": None, "mlflow_run_id": None}
        return {directions[0]: net}, {directions[0]: cfg}, {**info, "config": {}, "crop_size": None}
    raise ModelSourceError(
        f"{where}: neither a training checkpoint (a dict with 'nets') nor a generator state dict"
    )


# MLflow


def write_generator_files(net: nn.Module, cfg: ModelConfig, folder: str) -> list[str]:
    """Write the weights and architecture files of ``net`` into ``folder``; returns their
    paths (``log_generators`` passes them to MLflow as the model's ``extra_files``)."""
    weights = os.path.join(folder, WEIGHTS_FILE)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, weights)
    arch = os.path.join(folder, ARCH_FILE)
    with open(arch, "w") as f:
        json.dump({"format": ARCH_FORMAT, "model": dataclasses.asdict(cfg)}, f, indent=2)
    return [weights, arch]


def _read_generator_files(folder: str, uri: str) -> tuple[ResnetGenerator, ModelConfig]:
    where = f"{uri} ({WEIGHTS_FILE})"
    try:
        with open(os.path.join(folder, ARCH_FILE)) as f:
            tree = json.load(f)
        if tree.get("format") != ARCH_FORMAT:
            raise ValueError(f"format {tree.get('format')!r}, expected {ARCH_FORMAT}")
        cfg = _model_config(tree["model"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelSourceError(f"model source {uri}: unusable {ARCH_FILE}: {exc}") from None
    try:
        state = torch.load(
            os.path.join(folder, WEIGHTS_FILE), map_location="cpu", weights_only=True
        )
    except Exception as exc:
        raise ModelSourceError(f"{where}: cannot be loaded as plain weights: {exc}") from None
    if not _is_official_state(state):
        raise ModelSourceError(f"{where}: not a generator state dict")
    return build_from_state(state, cfg, where), cfg


def _from_mlflow_model(folder: str, uri: str, trust_pickle: bool) -> tuple[nn.Module, ModelConfig]:
    """The generator of a downloaded MLflow model folder. Anything but our own files is refused
    unless ``trust_pickle``: MLflow would unpickle a pickled model, and torch.export.load the
    records of a pt2 archive."""
    import mlflow

    extra = os.path.join(folder, "extra_files")
    if all(os.path.isfile(os.path.join(extra, n)) for n in (WEIGHTS_FILE, ARCH_FILE)):
        return _read_generator_files(extra, uri)
    if not trust_pickle:
        pickled = any("model.pth" in files for _, _, files in os.walk(folder))
        what = (
            "a PyTorch model saved with pickle"
            if pickled
            else f"not a generator logged by this pipeline (no extra_files/{WEIGHTS_FILE})"
        )
        raise ModelSourceError(
            f"model source {uri}: {what}; loading it would unpickle it, which can run any "
            "code. Pass --trust-pickle (trust_pickle=True) only for a model whose origin you "
            "trust"
        )
    net = mlflow.pytorch.load_model(folder, map_location="cpu")
    if not isinstance(net, nn.Module):
        raise ModelSourceError(f"model source {uri}: not a torch module ({type(net)})")
    return net.eval(), arch_of(net)


def _mlflow_locate(uri: str, client) -> tuple[str | None, str | None]:
    """(source run id, logged model name) of an MLflow model URI, where they can be found."""
    rest = uri.split(":/", 1)[1].strip("/")
    if uri.startswith("runs:/"):
        run_id, _, path = rest.partition("/")
        return run_id, (path or None)
    name, _, version = rest.partition("/")
    if name.startswith("m-") and not version and "@" not in name:
        logged = client.get_logged_model(name)
        return logged.source_run_id, logged.name
    if "@" in name:
        model, alias = name.split("@", 1)
        mv = client.get_model_version_by_alias(model, alias)
    elif version:
        mv = client.get_model_version(name, version)
    else:
        return None, None
    model_name = None
    model_id = getattr(mv, "model_id", None) or (
        mv.source.split(":/", 1)[1].strip("/") if str(mv.source).startswith("models:/m-") else None
    )
    if model_id:
        model_name = client.get_logged_model(model_id).name
    return mv.run_id, model_name


def _load_mlflow(
    source: str, directions: list[str], tracking_uri: str | None, strict: bool, trust_pickle: bool
) -> tuple[dict, dict, dict]:
    """Generators of an MLflow source; with ``strict`` every asked direction must load. A model
    that would be unpickled is refused (whichever direction) unless ``trust_pickle``."""
    # Long on purpose: the URI forms MLflow accepts each need their own lookup, kept together.
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run_id, name = _mlflow_locate(source, client)
    except Exception as exc:
        raise ModelSourceError(
            f"model source {source}: not found in MLflow at {uri}: {exc}"
        ) from None
    named = _MLFLOW_NAME.search(name or "")
    if named is None and name is None and source.startswith("runs:/"):
        # runs:/RUN_ID: the run's generators, chosen by direction.
        uris = {d: f"runs:/{run_id}/{MLFLOW_MODEL_NAME[d]}" for d in directions}
    elif named is not None:
        # The URI names one generator of a pair; the other one is its sibling in the same run.
        own = named.group(1)
        if strict and own != directions[0]:
            raise ModelSourceError(
                f"model source {source} is {name} ({own}) but direction {directions[0]} was "
                f"asked: pass --direction {own}, or runs:/{run_id} to choose by direction"
            )
        uris = {own: source}
        for d in directions:
            if d != own and run_id:
                uris[d] = f"runs:/{run_id}/{MLFLOW_MODEL_NAME[d]}"
    else:
        uris = {directions[0]: source}  # a model of another name: taken as the asked direction
    uris = {d: uris[d] for d in directions if d in uris}
    nets, cfgs = {}, {}
    for d, model_uri in uris.items():
        # Downloaded into a folder of our own, removed once loaded (MLflow's default leaves a
        # copy of the model in the system's temp folder on every load).
        with tempfile.TemporaryDirectory(prefix="cyclegan-model-") as tmp:
            try:
                folder = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
            except Exception as exc:
                if strict or d == directions[0]:
                    raise ModelSourceError(
                        f"model source {model_uri}: cannot load from {uri}: {exc}"
                    ) from None
                continue  # the reverse generator is optional
            try:
                nets[d], cfgs[d] = _from_mlflow_model(folder, model_uri, trust_pickle)
            except ModelSourceError:
                raise
            except Exception as exc:
                raise ModelSourceError(
                    f"model source {model_uri}: cannot load from {uri}: {exc}"
                ) from None
    config: dict = {}
    if run_id:
        try:
            config = mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json")
        except Exception:
            config = {}  # a model logged outside training has no config; nothing depends on it
    info = {
        "kind": "mlflow",
        "path": source,
        "step": None,
        "mlflow_run_id": run_id,
        "config": config,
        "crop_size": (config.get("data") or {}).get("crop_size"),
    }
    return nets, cfgs, info


# public API


def load_generators(
    source: str,
    directions: list[str] | tuple[str, ...] = DIRECTIONS,
    *,
    storage: str | None = None,
    arch: ModelConfig | None = None,
    tracking_uri: str | None = None,
    trust_pickle: bool = False,
) -> tuple[dict[str, nn.Module], dict[str, ModelConfig], dict]:
    """The generators of ``directions`` that ``source`` holds, in eval mode on the CPU.

    The first direction must be there; the others are loaded where the source has them
    (checkpoints and MLflow runs hold both, an official file holds one, taken to translate in
    the first direction). Returns ``({direction: net}, {direction: ModelConfig}, info)``; info has
    ``source``, ``kind`` (checkpoint, mlflow, official), ``path``, ``step``, ``mlflow_run_id``,
    ``config`` (the training config, ``{}`` when unknown) and ``crop_size``. Nothing is
    unpickled: an MLflow model that would be is refused unless ``trust_pickle``.
    """
    directions = [check_direction(d) for d in directions]
    if not directions:
        raise ValueError("directions: name at least one of AtoB, BtoA")
    source = str(source)
    if is_mlflow_uri(source):
        nets, cfgs, info = _load_mlflow(
            source, directions, tracking_uri, strict=False, trust_pickle=trust_pickle
        )
    else:
        nets, cfgs, info = _load_stored(source, directions, storage, arch)
    return nets, cfgs, {"source": source, **info}


def load_generator(
    source: str,
    direction: str = "AtoB",
    *,
    storage: str | None = None,
    arch: ModelConfig | None = None,
    tracking_uri: str | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, ModelConfig, dict]:
    """One generator of ``source`` (see the module docstring), in eval mode on the CPU.

    ``direction`` picks G_A (AtoB) or G_B (BtoA) of a checkpoint or MLflow run; an MLflow URI
    that names one generator must name that direction. ``arch`` gives the architecture of an
    official ``.pth`` file (default: read from its weights). The ModelConfig describes the
    returned generator (its input_nc is the channels it takes). ``trust_pickle``: see
    :func:`load_generators`. info: see :func:`load_generators`.
    """
    check_direction(direction)
    source = str(source)
    if is_mlflow_uri(source):
        nets, cfgs, info = _load_mlflow(
            source, [direction], tracking_uri, strict=True, trust_pickle=trust_pickle
        )
        info = {"source": source, **info}
    else:
        nets, cfgs, info = load_generators(source, [direction], storage=storage, arch=arch)
    return nets[direction], cfgs[direction], {**info, "direction": direction}
