"""Translation never writes outside --output, whatever keys a dataset's shards hold."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.models import load_generator
from pipeline.translation import Translator
from tests.test_export import write_run


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def translator(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda ref: ref)  # the payload, as the object store holds it
    write_run(tmp_path / "checkpoints", "RUN")
    net, cfg, _ = load_generator(tmp_path / "checkpoints" / "RUN", "AtoB")
    payload = {"arch": dataclasses.asdict(cfg), "state": net.state_dict(), "source": "test"}
    out = tmp_path / "work" / "out"
    return Translator([payload], str(out), str(tmp_path / "in"), None, "same", 1), out


def test_shard_keys_that_leave_the_output_are_errors_and_nothing_is_written(tmp_path, translator):
    udf, out = translator
    before = _files(tmp_path)
    outside = str(tmp_path / "abs" / "x.png")  # an absolute key, kept inside tmp_path
    bad = ["../x.png", "../../y.png", outside, "sub/../../z.png", "a\\..\\..\\w.png", ""]
    keys = ["good.png", *bad]
    result = udf(
        {
            "key": np.array(keys, dtype=object),
            "image": np.array([_png()] * len(keys), dtype=object),
        }
    )
    assert _files(tmp_path) - before == {out / "good.png"}
    errors = dict(zip(result["key"], result["error"], strict=True))
    assert errors["good.png"] == ""
    for key in bad:
        assert repr(key) in errors[key] and "not a relative POSIX path" in errors[key], key


def test_file_paths_outside_the_input_folder_are_refused(tmp_path, translator):
    udf, out = translator
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"not under"):
        udf(
            {
                "path": np.array([str(tmp_path / "elsewhere" / "x.png")], dtype=object),
                "bytes": np.array([_png()], dtype=object),
            }
        )
    assert _files(tmp_path) == before
