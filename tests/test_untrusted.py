"""Untrusted files never run code: checkpoints and official ``.pth`` files load with
``weights_only=True``, and config files are read with YAML's safe loader."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from cyclegan.checkpoint import load_checkpoint, load_official_generator
from pipeline.config import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Payload:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        # Arbitrary Python, run in this process (a shell command would start one).
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _write_payload(path, marker) -> None:
    # A state-dict-looking file whose unpickling runs code.
    torch.save({"model.1.weight": torch.zeros(1), "evil": Payload(str(marker))}, path)


def test_the_payload_is_live_under_plain_pickle(tmp_path):
    # The control: the same bytes do run code when loaded without weights_only.
    path, marker = tmp_path / "evil.pth", tmp_path / "ran"
    _write_payload(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loader", [load_checkpoint, load_official_generator])
def test_a_code_payload_is_refused_and_never_runs(loader, tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "ran"
    _write_payload(path, marker)
    with pytest.raises(ValueError, match=r"evil\.pth cannot be loaded") as info:
        loader(path)
    assert "weights_only" in str(info.value) or "Unsupported global" in str(info.value)
    assert not marker.exists()


def test_a_plain_pickle_checkpoint_is_refused(tmp_path):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "ran"
    path.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_checkpoint(path)
    assert not marker.exists()


EVIL_YAML = "loss:\n  lambda_A: !!python/object/apply:os.system ['touch {marker}']\n"


def test_config_file_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(EVIL_YAML.format(marker=marker))
    with pytest.raises(ValueError, match=r"evil\.yaml is not valid yaml"):
        load_file(path)
    assert not marker.exists()


@pytest.mark.integration
def test_train_cli_refuses_the_file_before_any_work(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(EVIL_YAML.format(marker=marker))
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", str(path)],
        cwd=REPO,
        env={**os.environ, "CYCLEGAN_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert "evil.yaml is not valid yaml" in res.stderr
    assert not marker.exists()
    assert not (tmp_path / "home").exists()  # nothing was started or written
