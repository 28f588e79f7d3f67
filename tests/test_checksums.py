"""A checkpoint inside a run counts only with its ``.sha256`` file; a file named directly loads
without one (an official ``.pth`` never has one)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
import torch

from pipeline import checkpoints
from pipeline.models import ModelSourceError, load_generator
from tests.test_export import make_tiny_checkpoint, same_weights, write_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_run_checkpoint_without_its_checksum_file_is_passed_over(tmp_path, capsys):
    ckpts = write_run(tmp_path, "RUN", {"checkpoint_000": 1, "checkpoint_001": 2})
    newest = tmp_path / "RUN" / "checkpoint_001" / "checkpoint.pt"
    (tmp_path / "RUN" / "checkpoint_001" / "checkpoint.pt.sha256").unlink()

    net, _, info = load_generator(tmp_path / "RUN", "AtoB")
    assert info["step"] == 1
    assert same_weights(net, ckpts["checkpoint_000"]["nets"]["G_A"])
    err = capsys.readouterr().err
    assert "checkpoint_001" in err and "checkpoint.pt.sha256 is missing" in err

    # Named directly, the same file loads: the user vouches for it.
    assert load_generator(newest, "AtoB")[2]["step"] == 2

    # With no checkpoint left that has its checksum file, the run is refused and says why.
    (tmp_path / "RUN" / "checkpoint_000" / "checkpoint.pt.sha256").unlink()
    with pytest.raises(ModelSourceError, match=r"no checkpoint.pt here.*sha256 is missing"):
        load_generator(tmp_path / "RUN", "AtoB")


def test_require_digest_only_refuses_a_missing_checksum_file(tmp_path):
    fs = pafs.LocalFileSystem()
    plain = tmp_path / "plain.pt"
    torch.save(make_tiny_checkpoint(5, seed=0), plain)
    assert checkpoints.load(fs, str(plain), "plain.pt")["step"] == 5
    with pytest.raises(checkpoints.CheckpointError, match=r"plain.pt: .*sha256 is missing"):
        checkpoints.load(fs, str(plain), "plain.pt", require_digest=True)
    write_run(tmp_path, "RUN")
    path, state = checkpoints.newest_loadable(fs, str(tmp_path / "RUN"), "RUN")
    assert state["step"] == 3 and path.endswith("checkpoint_000/checkpoint.pt")
