"""The checkpoint dict: one plain dict per checkpoint, safe to load with ``weights_only=True``.

``{version, step, epoch, config, nets: {G_A, G_B, D_A, D_B}, optimizers: {G, D},
schedulers: {G, D}, pools: {fake_A, fake_B}, rng, mlflow_run_id}``
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from cyclegan.config import ModelConfig
from cyclegan.networks import ResnetGenerator
from cyclegan.train_step import CycleGANNets, Optimizers, Pools, unwrap

CHECKPOINT_VERSION = 1


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu(tree):
    """A copy of a state tree with every tensor on the CPU (checkpoints load anywhere).

    Tensors are always copied: ``.cpu()`` of a CPU tensor would alias the live weights and
    optimizer moments, and the checkpoint would change as training goes on.
    """
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def make_checkpoint(
    *,
    step: int,
    epoch: int,
    config: dict,
    nets: CycleGANNets,
    optimizers: Optimizers,
    schedulers: dict,
    pools: Pools,
    mlflow_run_id: str | None = None,
    metrics: dict[str, float] | None = None,
) -> dict:
    """Build the checkpoint dict from live training state (wrappers removed, tensors on CPU);
    ``metrics``: the losses of the step it was taken at."""
    return {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "epoch": epoch,
        "config": config,
        "nets": {name: _cpu(unwrap(net).state_dict()) for name, net in nets.items()},
        "optimizers": {"G": _cpu(optimizers.G.state_dict()), "D": _cpu(optimizers.D.state_dict())},
        "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
        "pools": {"fake_A": pools.fake_A.state_dict(), "fake_B": pools.fake_B.state_dict()},
        "rng": capture_rng(),
        "mlflow_run_id": mlflow_run_id,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }


def restore_checkpoint(
    ckpt: dict,
    nets: CycleGANNets,
    optimizers: Optimizers,
    schedulers: dict,
    pools: Pools,
    device: torch.device | str = "cpu",
) -> tuple[int, int]:
    """Load every part of ``ckpt`` into live state; returns ``(step, epoch)``."""
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {ckpt.get('version')!r} is not {CHECKPOINT_VERSION}")
    for name, net in nets.items():
        unwrap(net).load_state_dict(ckpt["nets"][name])
    optimizers.G.load_state_dict(ckpt["optimizers"]["G"])
    optimizers.D.load_state_dict(ckpt["optimizers"]["D"])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(ckpt["schedulers"][name])
    pools.fake_A.load_state_dict(ckpt["pools"]["fake_A"], device)
    pools.fake_B.load_state_dict(ckpt["pools"]["fake_B"], device)
    restore_rng(ckpt["rng"])
    return ckpt["step"], ckpt["epoch"]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (what the ``.sha256`` file beside a checkpoint holds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> Path:
    """Write ``ckpt`` atomically, with a ``.sha256`` file beside it: a reader never sees a
    half-written file at ``path``, and a file altered later fails its checksum on load."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    path.with_name(path.name + ".sha256").write_text(digest + "\n")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True``; a clear error names a bad file
    (missing, truncated, not a checkpoint, or not matching its ``.sha256`` file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checksum = path.with_name(path.name + ".sha256")
    if checksum.is_file() and checksum.read_text().strip() != file_sha256(path):
        raise ValueError(f"checkpoint {path} does not match its checksum {checksum.name}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} cannot be loaded: {exc}") from exc


def load_official_generator(
    path: str | os.PathLike, cfg: ModelConfig | None = None, map_location: str = "cpu"
) -> ResnetGenerator:
    """A generator with the weights of an official ``*_net_G_A.pth`` / ``latest_net_G.pth`` file.

    ``cfg`` gives the architecture (default: the paper's 9 blocks, ngf 64, instance norm).
    """
    cfg = cfg or ModelConfig()
    state = load_checkpoint(path, map_location)
    if "nets" in state:
        raise ValueError(
            f"{path} is a training checkpoint of this project, not an official generator"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # Files written by old PyTorch versions carry running stats for instance norm; drop them.
    state = {
        k: v
        for k, v in state.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        or cfg.norm == "batch"
    }
    net = ResnetGenerator(cfg.input_nc, cfg.output_nc, cfg.ngf, cfg.n_blocks, cfg.norm)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not match a ResnetGenerator with {cfg}: {exc}") from exc
    return net.eval()
