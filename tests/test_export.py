"""Loading generators from every kind of source, and exporting them (TorchScript, ONNX)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from cyclegan.checkpoint import make_checkpoint, save_checkpoint
from cyclegan.config import ModelConfig
from cyclegan.networks import ResnetGenerator
from cyclegan.schedules import build_scheduler
from cyclegan.train_step import build_nets, build_optimizers, build_pools
from pipeline.config import tiny
from pipeline.exporters import PaddedGenerator, export, run_torchscript
from pipeline.models import (
    ModelSourceError,
    infer_arch,
    load_generator,
    load_generators,
)
from tests.cli import run_module

REPO = Path(__file__).resolve().parents[1]
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
# An exported generator against the eager one: other kernels (TorchScript's, ONNX Runtime's), so
# sums round in another order. A tanh output (|y| <= 1, slope <= 1) after ~15 reductions with
# sum K ~ 4,700 (convs C_in*kh*kw <= 392, instance norms over H*W <= 64*17) differs by
# ~eps32 * sqrt(4,700) = 8e-6; 12x that, under the worst case eps32 * K = 5.6e-4.
EXPORT_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny_checkpoint(step: int, seed: int, run_id: str | None = None) -> dict:
    """A real checkpoint dict of the tiny preset (ngf 8, 1 block), weights drawn from ``seed``."""
    cfg = tiny()
    torch.manual_seed(seed)
    nets = build_nets(cfg.model)
    opts = build_optimizers(nets, cfg.optim)
    scheds = {"G": build_scheduler(opts.G, cfg.optim), "D": build_scheduler(opts.D, cfg.optim)}
    return make_checkpoint(
        step=step,
        epoch=0,
        config=cfg.to_dict(),
        nets=nets,
        optimizers=opts,
        schedulers=scheds,
        pools=build_pools(cfg.loss.pool_size, seed),
        mlflow_run_id=run_id,
    )


def write_run(storage: Path, name: str = "RUN", steps: dict[str, int] | None = None) -> dict:
    """A run folder ``storage/name/checkpoint_*/checkpoint.pt``; returns {folder: checkpoint}."""
    steps = steps or {"checkpoint_000": 3}
    written = {}
    for i, (folder, step) in enumerate(steps.items()):
        ckpt = make_tiny_checkpoint(step, seed=100 + i, run_id=f"run-{name}")
        save_checkpoint(ckpt, storage / name / folder / "checkpoint.pt")
        written[folder] = ckpt
    (storage / name / "cyclegan_run.json").write_text(json.dumps({"mlflow_run_id": f"run-{name}"}))
    return written


def same_weights(net: torch.nn.Module, state: dict) -> bool:
    own = net.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)


# sources


def test_direction_picks_the_generator_and_the_newest_step_wins(tmp_path):
    # Folder names sort the other way round from the steps: the step decides.
    ckpts = write_run(tmp_path, "RUN", {"checkpoint_000": 20, "checkpoint_001": 10})
    newest = ckpts["checkpoint_000"]
    g_a, cfg_a, info = load_generator(tmp_path / "RUN", "AtoB")
    g_b, cfg_b, _ = load_generator(tmp_path / "RUN", "BtoA")
    assert same_weights(g_a, newest["nets"]["G_A"])
    assert same_weights(g_b, newest["nets"]["G_B"])
    assert not same_weights(g_a, newest["nets"]["G_B"])
    assert not g_a.training
    assert (cfg_a.ngf, cfg_a.n_blocks) == (8, 1)
    assert info["step"] == 20 and info["kind"] == "checkpoint"
    assert info["mlflow_run_id"] == "run-RUN" and info["crop_size"] == 32
    assert info["path"].endswith(os.path.join("checkpoint_000", "checkpoint.pt"))


def test_every_form_of_a_stored_source_gives_the_same_generator(tmp_path, monkeypatch):
    storage = tmp_path / "checkpoints"
    ckpt = write_run(storage, "myrun")["checkpoint_000"]
    expected = ckpt["nets"]["G_B"]
    run_dir = storage / "myrun"
    sources = [
        str(run_dir),
        str(run_dir / "checkpoint_000"),
        str(run_dir / "checkpoint_000" / "checkpoint.pt"),
        f"file://{run_dir}",
    ]
    for source in sources:
        net, _, _ = load_generator(source, "BtoA")
        assert same_weights(net, expected), source
    net, _, _ = load_generator("myrun", "BtoA", storage=str(storage))
    assert same_weights(net, expected)
    # A bare NAME defaults to $CYCLEGAN_HOME/checkpoints.
    monkeypatch.setenv("CYCLEGAN_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "checkpoints" / "myrun")  # no "myrun" in the cwd
    net, _, info = load_generator("myrun", "BtoA")
    assert same_weights(net, expected) and info["step"] == 3


def test_load_generators_gives_both_of_a_checkpoint(tmp_path):
    ckpt = write_run(tmp_path)["checkpoint_000"]
    nets, cfgs, info = load_generators(str(tmp_path / "RUN"))
    assert set(nets) == {"AtoB", "BtoA"}
    assert same_weights(nets["AtoB"], ckpt["nets"]["G_A"])
    assert same_weights(nets["BtoA"], ckpt["nets"]["G_B"])
    assert info["source"] == str(tmp_path / "RUN")


def test_official_generator_file(tmp_path):
    torch.manual_seed(0)
    official = ResnetGenerator(3, 3, ngf=4, n_blocks=2).eval()
    path = tmp_path / "latest_net_G_A.pth"
    torch.save(official.state_dict(), path)
    x = torch.rand(1, 3, 20, 28) * 2 - 1

    net, cfg, info = load_generator(path, arch=ModelConfig(ngf=4, n_blocks=2))
    assert info["kind"] == "official" and info["mlflow_run_id"] is None
    assert torch.allclose(net(x), official(x))
    # Without flags the architecture is read from the weights.
    net, cfg, _ = load_generator(str(path), "BtoA")
    assert (cfg.ngf, cfg.n_blocks, cfg.norm) == (4, 2, "instance")
    assert torch.allclose(net(x), official(x))
    assert infer_arch(ResnetGenerator(3, 1, 6, 3, "batch").state_dict()) == ModelConfig(
        input_nc=3, output_nc=1, ngf=6, n_blocks=3, norm="batch"
    )
    with pytest.raises(ModelSourceError, match="latest_net_G_A.pth"):
        load_generator(path, arch=ModelConfig(ngf=8, n_blocks=2))


def test_bad_sources_say_what_is_wrong(tmp_path):
    write_run(tmp_path / "checkpoints", "alpha")
    write_run(tmp_path / "checkpoints", "beta")
    with pytest.raises(ModelSourceError, match="nope.pt: no such file"):
        load_generator(str(tmp_path / "nope.pt"))
    with pytest.raises(ModelSourceError, match=r"no run called 'gamma'.*alpha, beta"):
        load_generator("gamma", storage=str(tmp_path / "checkpoints"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file at all")
    with pytest.raises(ModelSourceError, match="corrupt.pt: cannot be loaded"):
        load_generator(str(corrupt))
    truncated = tmp_path / "truncated.pt"
    data = (tmp_path / "checkpoints" / "alpha" / "checkpoint_000" / "checkpoint.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError, match="truncated.pt"):
        load_generator(str(truncated))
    empty = tmp_path / "empty_run"
    (empty / "checkpoint_000").mkdir(parents=True)
    with pytest.raises(ModelSourceError, match="no checkpoint.pt here"):
        load_generator(str(empty))
    other = tmp_path / "other.pt"
    torch.save({"weights": [1, 2, 3]}, other)
    with pytest.raises(ModelSourceError, match="neither a training checkpoint"):
        load_generator(str(other))
    with pytest.raises(ValueError, match="direction"):
        load_generator(str(tmp_path / "checkpoints" / "alpha"), "AtoC")


def test_a_checkpoint_that_changed_after_saving_is_refused(tmp_path, capsys):
    write_run(tmp_path, "RUN", {"checkpoint_000": 1, "checkpoint_001": 2})
    path = tmp_path / "RUN" / "checkpoint_001" / "checkpoint.pt"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    Path(f"{path}.sha256").write_text(digest + "\n")
    assert load_generator(tmp_path / "RUN")[2]["step"] == 2
    torch.save(make_tiny_checkpoint(2, seed=7), path)  # the checksum file still names the old
    # Named directly, the altered file is refused.
    with pytest.raises(ModelSourceError, match="does not match its checksum"):
        load_generator(path)
    # Through its run, the newest checkpoint that verifies is used instead, as a resume does,
    # and the one passed over is named.
    assert load_generator(tmp_path / "RUN")[2]["step"] == 1
    assert "checkpoint_001" in capsys.readouterr().err
    # With no checkpoint left that verifies, the run is refused.
    older = tmp_path / "RUN" / "checkpoint_000" / "checkpoint.pt"
    older.write_bytes(older.read_bytes()[:100])
    with pytest.raises(ModelSourceError, match="no checkpoint.pt here"):
        load_generator(tmp_path / "RUN")


@pytest.mark.integration
def test_mlflow_sources(tmp_path):
    import mlflow

    from pipeline.tracking import log_generator

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    torch.manual_seed(0)
    gens = {"AtoB": ResnetGenerator(3, 3, 4, 1).eval(), "BtoA": ResnetGenerator(3, 3, 4, 1).eval()}
    model_ids = {}
    with mlflow.start_run(experiment_id=experiment) as run:
        for d, net in gens.items():
            logged = log_generator(net, ModelConfig(ngf=4, n_blocks=1), f"generator_{d}", 8)
            model_ids[d] = logged.model_id
    rid = run.info.run_id

    def check(source, direction, expected):
        net, cfg, info = load_generator(source, direction, tracking_uri=uri)
        assert same_weights(net, gens[expected].state_dict()), source
        assert info["mlflow_run_id"] == rid and info["kind"] == "mlflow"
        assert (cfg.ngf, cfg.n_blocks) == (4, 1)

    check(f"runs:/{rid}/generator_AtoB", "AtoB", "AtoB")
    check(f"runs:/{rid}", "BtoA", "BtoA")
    check(f"models:/{model_ids['BtoA']}", "BtoA", "BtoA")
    with pytest.raises(ModelSourceError, match="generator_BtoA.*--direction BtoA"):
        load_generator(f"runs:/{rid}/generator_BtoA", "AtoB", tracking_uri=uri)
    with pytest.raises(ModelSourceError, match="runs:/0123456789abcdef"):
        load_generator("runs:/0123456789abcdef/generator_AtoB", tracking_uri=uri)
    version = mlflow.register_model(f"models:/{model_ids['AtoB']}", "tiny-AtoB").version
    mlflow.MlflowClient(tracking_uri=uri).set_registered_model_alias(
        "tiny-AtoB", "champion", version
    )
    check("models:/tiny-AtoB@champion", "AtoB", "AtoB")
    check(f"models:/tiny-AtoB/{version}", "AtoB", "AtoB")
    # One generator's URI names the pair: evaluation gets both.
    for source in (f"runs:/{rid}/generator_AtoB", "models:/tiny-AtoB@champion"):
        nets, _, _ = load_generators(source, tracking_uri=uri)
        assert set(nets) == {"AtoB", "BtoA"}
        assert same_weights(nets["BtoA"], gens["BtoA"].state_dict())


# export


@pytest.fixture
def tiny_generator():
    torch.manual_seed(1)
    return ResnetGenerator(3, 3, ngf=4, n_blocks=1).eval()


def test_padded_generator_equals_the_generator(tiny_generator):
    wrapped = PaddedGenerator(tiny_generator)
    for shape in [(1, 3, 16, 16), (2, 3, 17, 30), (1, 3, 5, 9)]:
        x = torch.rand(shape) * 2 - 1
        with torch.no_grad():
            assert torch.equal(wrapped(x), tiny_generator(x)), shape


def test_torchscript_export_keeps_dynamic_shapes(tmp_path):
    write_run(tmp_path / "checkpoints")
    net, _, _ = load_generator(tmp_path / "checkpoints" / "RUN", "AtoB")
    result = export(net, str(tmp_path / "out"), size=32, formats=["torchscript"])
    path = result["files"]["torchscript"]
    assert path.endswith("generator_AtoB.torchscript.pt") and os.path.isfile(path)
    assert set(result["max_abs_diff"]["torchscript"]) == {"1x32x32", "2x19x25"}
    assert all(d <= EXPORT_ATOL for d in result["max_abs_diff"]["torchscript"].values())
    for shape in [(1, 3, 32, 32), (1, 3, 30, 45), (3, 3, 17, 22)]:
        x = torch.rand(shape) * 2 - 1
        got = run_torchscript(path, x)
        with torch.no_grad():
            want = net(x)
        assert got.shape == want.shape == shape
        assert (got - want).abs().max().item() <= EXPORT_ATOL
    meta = json.loads(Path(result["metadata"]).read_text())
    assert meta["input"]["range"] == [-1.0, 1.0]
    assert meta["files"]["torchscript"] == "generator_AtoB.torchscript.pt"


@pytest.mark.skipif(not HAS_ONNX, reason="onnx and onnxscript are not installed")
def test_onnx_export_keeps_dynamic_shapes(tmp_path, tiny_generator):
    result = export(tiny_generator, str(tmp_path), direction="BtoA", size=32, formats=["onnx"])
    path = result["files"]["onnx"]
    assert path.endswith("generator_BtoA.onnx") and os.path.isfile(path)
    if not HAS_ORT:
        pytest.skip("onnxruntime is not installed: the export is not checked")
    assert all(d <= EXPORT_ATOL for d in result["max_abs_diff"]["onnx"].values())
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 30, 45), (3, 3, 64, 17)]:
        x = torch.rand(shape) * 2 - 1
        got = session.run(["output"], {"image": x.numpy()})[0]
        with torch.no_grad():
            want = tiny_generator(x).numpy()
        assert got.shape == want.shape
        assert abs(got - want).max() <= EXPORT_ATOL


def test_missing_onnx_packages_are_named(tmp_path, tiny_generator, monkeypatch):
    from pipeline.exporters import ExportError

    monkeypatch.setitem(sys.modules, "onnx", None)  # find_spec then reports it missing
    with pytest.raises(ExportError, match=r"needs the package\(s\) onnx.*pip install onnx"):
        export(tiny_generator, str(tmp_path), size=16, formats=["torchscript", "onnx"])
    assert not list(tmp_path.iterdir())  # nothing half-done


@pytest.mark.integration
def test_export_cli(tmp_path):
    write_run(tmp_path / "checkpoints", "clirun")
    out = tmp_path / "exported"
    res = run_module(
        "pipeline.export",
        "--model",
        "clirun",
        "--storage",
        str(tmp_path / "checkpoints"),
        "--direction",
        "BtoA",
        "--out",
        str(out),
        "--size",
        "24",
        "--formats",
        "torchscript",
    )
    assert res.returncode == 0, res.stderr
    assert "input 1x24x24: max abs diff vs PyTorch" in res.stdout
    assert "input 2x15x19: max abs diff vs PyTorch" in res.stdout
    assert (out / "generator_BtoA.torchscript.pt").is_file()
    assert json.loads((out / "generator_BtoA.json").read_text())["step"] == 3

    res = run_module(
        "pipeline.export",
        *("--model", str(tmp_path / "missing"), "--out", str(out), "--formats", "torchscript"),
    )
    assert res.returncode == 2
    assert "missing: no such file or folder" in res.stderr
    if not HAS_ONNX:
        res = run_module("pipeline.export", "--model", "clirun", "--out", str(out))
        assert res.returncode == 2 and "pip install onnx" in res.stderr
