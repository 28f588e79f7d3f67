"""The flags the commands share, how they build a config, and the one error path of a command.

A config is resolved as: preset (or a resumed run's saved config), then ``--config FILE``, then
each ``--set section.field=value``, then the first-class flags (``--data``, ``--storage``, ...).

Building a parser imports nothing heavy, so ``--help`` answers at once: ``pipeline.config``
(which imports ``cyclegan`` and with it torch) and everything else a command runs on is imported
by the functions that use it.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import Config

PRESET_NAMES = ("demo", "paper", "paper128", "tiny")
"""The keys of ``pipeline.config.PRESETS``, named here for the help text (a test keeps them
equal)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix (bad flag, file, dataset, storage, a download or an
    image folder): exit 2, no traceback. (Imported here, not at the top, so ``--help`` stays
    fast; they are needed only when something went wrong.)"""
    from pipeline.datasets import DownloadError
    from pipeline.image_import import PrepareError
    from pipeline.shards import DatasetError
    from pipeline.storage import StorageError

    return (ValueError, DatasetError, StorageError, DownloadError, PrepareError)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The flags that build a run's config (train, tune, ablation)."""
    p.add_argument(
        "--preset", default="demo", help=f"one of {', '.join(PRESET_NAMES)} (default demo)"
    )
    p.add_argument("--config", help="YAML or JSON file with the same tree as the resolved config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field (repeatable)")  # fmt: skip
    p.add_argument("--data", "--dataroot", help="dataset root (local folder, s3://, gs://)")
    p.add_argument("--storage", help="where run folders and checkpoints go (local, s3://, gs://)")
    p.add_argument("--num-workers", type=int, help="training workers (DDP ranks) per run")
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--gpu", action="store_true", help="one GPU per worker")
    dev.add_argument("--cpu", action="store_true", help="train on CPUs even if GPUs exist")
    p.add_argument("--epochs", type=int, help="epochs at constant lr (decay epochs keep the ratio)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--verbose", action="store_true",
                   help="keep Ray's own output (Ray Data banners and bars, Ray's log levels)")  # fmt: skip
    add_address_flag(p)


def add_address_flag(p: argparse.ArgumentParser) -> None:
    """``--address``, the Ray cluster of every command that runs on Ray."""
    p.add_argument(
        "--address",
        help="Ray cluster address, or local for a private one (default: $RAY_ADDRESS, else the "
        "cluster `ray start` runs on this machine, else a private one)",
    )


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    """``--progress``/``--no-progress``: tqdm bars on stderr (default: on a terminal only)."""
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="progress bars on stderr (default: only when stderr is a terminal)",
    )


def _deep_update(tree: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_update(tree[key], value)
        else:
            tree[key] = value
    return tree


def _flag_tree(args: argparse.Namespace) -> dict:
    flags: dict = {}
    pairs = (
        ("data", "data", "uri"),
        ("storage", "storage", "uri"),
        ("num_workers", "scaling", "num_workers"),
        ("name", "storage", "name"),
        ("max_steps", "train", "max_steps"),
        ("register", "tracking", "register"),
        ("address", "scaling", "address"),
    )
    for attr, section, key in pairs:
        value = getattr(args, attr, None)
        if value is not None and value != "":
            flags.setdefault(section, {})[key] = value
    if getattr(args, "gpu", False) or getattr(args, "cpu", False):
        flags.setdefault("scaling", {})["use_gpu"] = bool(args.gpu)
    if getattr(args, "resume", None):
        flags.setdefault("storage", {}).update(name=args.resume, resume=True)
    return flags


def build_config(args: argparse.Namespace, saved: dict | None = None) -> Config:
    """Preset (or a resumed run's saved config), then file, then --set, then flags."""
    from pipeline import config as C
    from pipeline import overrides

    cfg = C.from_dict(saved) if saved else C.preset(args.preset)
    tree: dict = {}
    if args.config:
        _deep_update(tree, C.load_file(args.config))
    for item in args.set:
        _deep_update(tree, overrides.parse_override(item))
    _deep_update(tree, _flag_tree(args))
    cfg = C.merge(cfg, tree)
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError("--epochs: must be >= 1")
        decay = round(args.epochs * cfg.optim.n_epochs_decay / max(cfg.optim.n_epochs, 1))
        cfg = C.merge(cfg, {"optim": {"n_epochs": args.epochs, "n_epochs_decay": decay}})
    return cfg


def load_config(args: argparse.Namespace) -> Config:
    """The config of a command's flags; with ``--resume NAME``, the run's saved config first.

    A saved URI whose credentials were masked when it was written is taken from the flags or
    the defaults again (credentials come from the environment, never from saved files)."""
    if not getattr(args, "resume", None):
        return build_config(args)
    from pipeline import config as C
    from pipeline import runs

    probe = C.with_defaults(build_config(args))
    saved = runs.read_info(probe.storage.uri, args.resume)["config"]
    for section in ("data", "storage", "tracking"):
        if "***" in str(saved.get(section, {}).get("uri", "")):
            saved[section]["uri"] = ""
    return build_config(args, saved)


def for_runs_of(args: argparse.Namespace) -> argparse.Namespace:
    """Another command's flags as ``build_config`` reads them: its ``--name`` names a sweep or
    an ablation, not a training run."""
    return argparse.Namespace(**{**vars(args), "name": None, "resume": None, "register": None})


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every command that loads a generator shares."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="SOURCE",
        help="run NAME, run/checkpoint folder, checkpoint.pt, runs:/ or models:/ URI, or .pth",
    )
    parser.add_argument(
        "--storage", help="where run NAMEs live (default $CYCLEGAN_HOME/checkpoints)"
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load an MLflow model saved with pickle (runs any code it holds: trusted ones only)",
    )
    arch = parser.add_argument_group("architecture of an official .pth (default: from its weights)")
    arch.add_argument("--ngf", type=int, help="filters of the first conv (paper: 64)")
    arch.add_argument("--n-blocks", type=int, help="residual blocks (paper: 9 at 256 px)")
    arch.add_argument("--norm", choices=("instance", "batch", "none"), help="normalisation")


def arch_from_flags(args: argparse.Namespace):
    """The ``--ngf/--n-blocks/--norm`` flags as a ModelConfig (None when none is given)."""
    from cyclegan.config import ModelConfig

    if args.ngf is None and args.n_blocks is None and args.norm is None:
        return None
    default = ModelConfig()
    return ModelConfig(
        ngf=default.ngf if args.ngf is None else args.ngf,
        n_blocks=default.n_blocks if args.n_blocks is None else args.n_blocks,
        norm=args.norm or default.norm,
    )


def run_command(body: Callable[[], int | None], what: str) -> int:
    """Run a command's body with the one error path: a user error prints ``error: ...`` and
    exits 2; anything else prints the traceback and ``error: WHAT failed: ...`` and exits 1.
    Both are redacted (no credential reaches the terminal or a log). Ctrl-C (and SIGTERM, made
    into the same) exits 130 after the body's own clean-up ran."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    from pipeline.storage import redact

    try:
        return body() or 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except user_errors() as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(redact(traceback.format_exc()), file=sys.stderr)
        print(f"error: {what} failed: {redact(str(exc))}", file=sys.stderr)
        return 1
