"""MLflow models: what training logs loads back without unpickling anything, and a pickled
model is refused unless the caller trusts it (in this process, a local SQLite store)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from ray.train import Checkpoint
from torch import nn

from cyclegan.checkpoint import save_checkpoint
from cyclegan.config import ModelConfig
from cyclegan.networks import ResnetGenerator
from pipeline import tracking
from pipeline.config import Config, merge, tiny, with_defaults
from pipeline.models import ModelSourceError, load_generator, load_generators
from tests.test_export import make_tiny_checkpoint, same_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _unpickled(marker: str) -> nn.Module:
    """What the crafted model's pickle calls when it is loaded: any code could run here."""
    Path(marker).write_text("unpickled")
    return ResnetGenerator(3, 3, 4, 1).eval()


class PicklePayload(nn.Module):
    """A model whose unpickling calls ``_unpickled`` (a stand-in for a malicious payload)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return _unpickled, (self.marker,)


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    # MLflow tags runs and models with the git commit by running git: no process in unit tests.
    monkeypatch.setattr("mlflow.tracking.context.git_context._resolve_git_info", dict)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    return uri


def log_pickled(tmp_path: Path, store: str, marker: Path) -> tuple[str, str]:
    """(run id, model id) of a crafted model logged in pickle format as generator_AtoB."""
    experiment = mlflow.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    # A run made by the client: the fluent API's new run would ask git for the source version.
    rid = mlflow.MlflowClient(tracking_uri=store).create_run(experiment).info.run_id
    with mlflow.start_run(run_id=rid):
        logged = mlflow.pytorch.log_model(
            PicklePayload(str(marker)),
            name="generator_AtoB",
            serialization_format="pickle",
            pip_requirements=["torch"],
        )
    assert not marker.exists()
    return rid, logged.model_id


def test_a_pickled_mlflow_model_is_refused_and_never_unpickled(tmp_path, store):
    marker = tmp_path / "marker"
    rid, model_id = log_pickled(tmp_path, store, marker)
    for source in (f"runs:/{rid}/generator_AtoB", f"runs:/{rid}", f"models:/{model_id}"):
        with pytest.raises(ModelSourceError, match=r"pickle.*--trust-pickle") as refused:
            load_generator(source, "AtoB", tracking_uri=store)
        assert "generator_AtoB" in str(refused.value) or model_id in str(refused.value)
        with pytest.raises(ModelSourceError, match="--trust-pickle"):
            load_generators(source, tracking_uri=store)
        assert not marker.exists(), source
    # Trusted on purpose, it loads (and the payload was live all along).
    net, _, _ = load_generator(f"runs:/{rid}", "AtoB", tracking_uri=store, trust_pickle=True)
    assert marker.exists() and isinstance(net, ResnetGenerator)


def test_the_commands_refuse_a_pickled_model_unless_trusted(tmp_path, store, monkeypatch, capsys):
    from pipeline import export

    marker = tmp_path / "marker"
    rid, _ = log_pickled(tmp_path, store, marker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    argv = ["--model", f"runs:/{rid}", "--out", str(tmp_path / "out"), "--formats", "torchscript"]
    assert export.main(argv) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not marker.exists()
    assert export.main([*argv, "--size", "16", "--trust-pickle"]) == 0
    assert marker.exists() and (tmp_path / "out" / "generator_AtoB.torchscript.pt").is_file()


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> tuple[str, str, dict, Config]:
    """(tracking URI, run id, checkpoint, config) of generators logged as training logs them."""
    tmp = tmp_path_factory.mktemp("logged")
    store = f"sqlite:///{tmp}/mlflow.db"
    cfg = with_defaults(
        merge(tiny(), {"tracking": {"uri": store, "experiment": "gens", "register": "tiny"}})
    )
    ckpt = make_tiny_checkpoint(step=7, seed=3)
    save_checkpoint(ckpt, tmp / "ckpt" / "checkpoint.pt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mlflow.tracking.context.git_context._resolve_git_info", dict)
        rid = tracking.start_run(cfg, "gens-run", {})
        tracking.log_generators(cfg, rid, Checkpoint.from_directory(str(tmp / "ckpt")))
    return store, rid, ckpt, cfg


def test_logged_generators_load_back_with_identical_weights_without_pickle(logged, monkeypatch):
    store, rid, ckpt, cfg = logged

    def unsafe(*args, **kwargs):
        raise AssertionError("a loader that can unpickle was called")

    real_load = torch.load

    def safe_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", safe_load)
    monkeypatch.setattr(torch.export, "load", unsafe)
    monkeypatch.setattr(mlflow.pytorch, "load_model", unsafe)

    nets, cfgs, info = load_generators(f"runs:/{rid}", tracking_uri=store)
    assert same_weights(nets["AtoB"], ckpt["nets"]["G_A"])
    assert same_weights(nets["BtoA"], ckpt["nets"]["G_B"])
    assert isinstance(nets["AtoB"], ResnetGenerator) and not nets["AtoB"].training
    assert cfgs["AtoB"] == cfg.model and cfgs["BtoA"] == cfg.model.reversed()
    assert info["kind"] == "mlflow" and info["crop_size"] == 32
    net, _, _ = load_generator("models:/tiny-BtoA/1", "BtoA", tracking_uri=store)
    assert same_weights(net, ckpt["nets"]["G_B"])


def test_plain_mlflow_users_load_the_logged_generator_without_pickle(logged, monkeypatch):
    """What the README promises: ``mlflow.pytorch.load_model`` gives a module that takes any
    batch and image size of at least 4 px, and it loads with MLflow's pickle check on."""
    store, rid, ckpt, _ = logged
    mlflow.set_tracking_uri(store)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    exported = mlflow.pytorch.load_model(f"runs:/{rid}/generator_AtoB")
    assert same_weights(exported, ckpt["nets"]["G_A"])  # the generator's own key names
    eager, _, _ = load_generator(f"runs:/{rid}", "AtoB", tracking_uri=store)
    for shape in [(1, 3, 32, 32), (2, 3, 30, 45), (3, 3, 5, 9)]:
        x = torch.rand(shape) * 2 - 1
        with torch.no_grad():
            assert torch.allclose(exported(x), eager(x), atol=1e-5), shape


def test_the_weights_file_of_a_generator_is_read_with_weights_only(tmp_path, store):
    """Our own layout with a weights file that carries a pickle payload is refused too."""
    from pipeline.models import write_generator_files

    marker = tmp_path / "marker"
    folder = tmp_path / "files"
    folder.mkdir()
    cfg = ModelConfig(ngf=4, n_blocks=1)
    weights, _ = write_generator_files(ResnetGenerator(3, 3, 4, 1), cfg, str(folder))
    torch.save(PicklePayload(str(marker)), weights)
    experiment = mlflow.create_experiment("w", artifact_location=(tmp_path / "art").as_uri())
    client = mlflow.MlflowClient(tracking_uri=store)
    rid = client.create_run(experiment).info.run_id
    client.log_artifacts(rid, str(folder), "generator_AtoB/extra_files")
    with pytest.raises(ModelSourceError, match="generator.pt.*cannot be loaded as plain weights"):
        load_generator(f"runs:/{rid}/generator_AtoB", "AtoB", tracking_uri=store)
    assert not marker.exists()
