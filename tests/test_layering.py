"""The layer rule: ``cyclegan/`` never imports ray, mlflow or torch.distributed; nor does the
benchmark (``pipeline.bench``) load ray or mlflow, so it measures the step without a cluster;
nor does what Ray Data's own processes import (``pipeline.reading``) load torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cyclegan"
BANNED = ("ray", "mlflow", "torch.distributed")
MODULE_FILES = sorted(PACKAGE.rglob("*.py"))


def banned(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in BANNED)


def imported_modules(tree: ast.AST) -> list[str]:
    """Every module an import statement names, including ``from torch import distributed``."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    return names


def test_the_package_has_modules():
    names = {p.name for p in MODULE_FILES}
    assert {"__init__.py", "networks.py", "train_step.py", "checkpoint.py"} <= names


def test_rule_detects_banned_imports():
    source = (
        "import ray.train\nfrom mlflow import log_metric\nfrom torch import distributed\n"
        "import torch.distributed as dist\nimport importlib\nimportlib.import_module('ray')\n"
        "import rayon\nfrom torch import nn\n"
    )
    found = [m for m in imported_modules(ast.parse(source)) if banned(m)]
    assert found == [
        "ray.train",
        "mlflow",
        "mlflow.log_metric",
        "torch.distributed",
        "torch.distributed",
        "ray",
    ]


@pytest.mark.parametrize("path", MODULE_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_does_not_import_distributed_or_tracking_code(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    offending = [m for m in imported_modules(tree) if banned(m)]
    assert not offending, f"{path} imports {offending}"


# Run in a fresh interpreter: for each module, which of ray and mlflow importing it loaded. (torch
# itself loads torch.distributed, so for that the source check above is the one that can tell.)
MEASURE_IMPORTS = """
import importlib, json, sys
found = {}
for name in json.loads(sys.argv[1]):
    before = set(sys.modules)
    importlib.import_module(name)
    found[name] = sorted({m.split(".")[0] for m in set(sys.modules) - before} & {"ray", "mlflow"})
print(json.dumps(found))
"""


@pytest.mark.integration  # a fresh interpreter: this one may have imported ray and mlflow
def test_importing_every_module_loads_neither_ray_nor_mlflow():
    """Every cyclegan module, and the benchmark, which times the training step without a
    cluster; then ``ray`` itself, the control that shows the check sees such an import."""
    names = []
    for path in MODULE_FILES:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    assert "cyclegan.networks" in names and "cyclegan" in names
    names += ["pipeline.bench", "ray"]
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_IMPORTS, json.dumps(names)],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(found) == names  # each one was imported, in this order
    control = found.pop("ray")
    assert {name: loaded for name, loaded in found.items() if loaded} == {}
    assert control == ["ray"]


def test_ray_datas_own_processes_load_no_torch():
    """Ray Data's split coordinators and Ray Train's dataset manager unpickle the datasets
    ``pipeline.reading`` builds (its decode function, its scheduling callback), so they import
    it: with torch among its imports each of them paid ~1.5 s of CPU and 200 MB at every run's
    start. An image already at its load size decodes without torch too."""
    import importlib
    import io

    from PIL import Image

    from tests.import_guard import refused_imports

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "PNG")
    fresh = lambda name: name.partition(".")[0] in ("pipeline", "cyclegan")  # noqa: E731
    with refused_imports(("torch", "torchvision"), fresh=fresh) as asked:
        reading = importlib.import_module("pipeline.reading")
        cfg = importlib.import_module("cyclegan.config").AugmentConfig(load_size=8, crop_size=8)
        out = reading.decode_resize_batch({"key": ["a.png"], "image": [buffer.getvalue()]}, cfg)
    assert asked == []
    assert out["image"].shape == (1, 8, 8, 3) and list(out["key"]) == ["a.png"]
