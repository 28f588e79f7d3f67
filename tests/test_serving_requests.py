"""Serving's requests in this process: checks and their 4xx answers, routes, grouping by size,
the page, equality with translate's preprocessing, the settings and the pinning of an alias.
The real app on Ray is tested in test_serve.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cyclegan.config import ModelConfig
from cyclegan.networks import ResnetGenerator
from pipeline import serving, serving_page, serving_requests
from pipeline.serving import GeneratorService, ServeSettings
from pipeline.serving_requests import Prepared, RequestError
from tests.sample_images import bomb_png, image_bytes

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_service(max_pixels: int = serving.DEFAULT_MAX_PIXELS) -> GeneratorService:
    torch.manual_seed(0)
    nets = {"AtoB": ResnetGenerator(3, 3, 8, 1).eval(), "BtoA": ResnetGenerator(3, 3, 8, 1)}
    cfgs = dict.fromkeys(nets, ModelConfig(ngf=8, n_blocks=1))
    settings = ServeSettings("mem", "mem", ("AtoB", "BtoA"), max_pixels=max_pixels)
    return GeneratorService(nets, cfgs, {"kind": "checkpoint"}, settings)


# in this process


BAD_REQUESTS = [
    # (direction, body, query, status, words of the message)
    ("AtoB", b"", {}, 400, "empty body"),
    ("AtoB", b"hello, not an image", {}, 415, "not an image"),
    ("AtoB", image_bytes(40, 30)[:80], {}, 400, "truncated"),
    ("AtoB", bomb_png(), {}, 413, "decompression bomb"),
    ("CtoD", image_bytes(8, 8), {}, 404, "unknown direction 'CtoD'"),
    ("AtoB", image_bytes(8, 8), {"size": "big"}, 400, "not a whole number"),
    ("AtoB", image_bytes(8, 8), {"size": "2"}, 400, "size=2: must be from 4"),
    ("AtoB", image_bytes(8, 8), {"format": "gif"}, 400, "use one of png, jpeg, webp"),
    ("AtoB", image_bytes(8, 8), {"quality": "9"}, 400, "unknown query parameter(s) quality"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=lambda c: c[4])
def test_bad_requests_get_a_4xx_naming_the_problem(case):
    direction, body, query, status, words = case
    with pytest.raises(RequestError) as refused:
        tiny_service().prepare(direction, body, query)
    assert refused.value.status == status and words in refused.value.message


def test_the_pixel_limit_applies_to_the_upload_and_to_the_size_asked():
    service = tiny_service(max_pixels=64 * 64)
    with pytest.raises(RequestError, match="exceeds the limit of 4096") as refused:
        service.prepare("AtoB", image_bytes(80, 60), {})
    assert refused.value.status == 413
    with pytest.raises(RequestError, match=r"size=60 makes 90x60") as refused:
        service.prepare("AtoB", image_bytes(45, 30), {"size": "60"})
    assert refused.value.status == 413
    assert service.prepare("AtoB", image_bytes(45, 30), {"size": "40"}).pixels.shape == (40, 60, 3)


def test_a_direction_the_model_lacks_is_a_404():
    service = tiny_service()
    one = GeneratorService(
        {"BtoA": service.nets["BtoA"]}, {"BtoA": ModelConfig()}, {}, service.settings
    )
    with pytest.raises(RequestError, match="serves BtoA only, not AtoB") as refused:
        one.prepare("AtoB", image_bytes(8, 8), {})
    assert refused.value.status == 404 and one.info["directions"] == ["BtoA"]


def test_routes_and_methods():
    service = tiny_service()
    assert service.route("GET", "/") == ("page", None)
    assert service.route("GET", "/healthz") == ("healthz", None)
    assert service.route("GET", "/info/") == ("info", None)
    assert service.route("POST", "/translate/BtoA") == ("translate", "BtoA")
    for method, path, status in (
        ("GET", "/translate/AtoB", 405),
        ("POST", "/info", 405),
        ("GET", "/nowhere", 404),
        ("POST", "/translate/AtoB/more", 404),
    ):
        with pytest.raises(RequestError) as refused:
            service.route(method, path)
        assert refused.value.status == status, (method, path)
    info = json.loads(service.answer("info").body)
    assert info["directions"] == ["AtoB", "BtoA"] and info["architecture"]["AtoB"]["ngf"] == 8
    assert service.answer("healthz").body == b"ok\n"


def test_a_batch_is_one_forward_per_direction_and_size():
    service = tiny_service()
    calls = []
    for direction, net in service.nets.items():
        net.register_forward_hook(
            lambda _m, inputs, _o, d=direction: calls.append((d, tuple(inputs[0].shape)))
        )
    sizes = [("AtoB", 20, 12), ("AtoB", 12, 20), ("AtoB", 20, 12), ("BtoA", 20, 12)]
    items = [
        Prepared(d, RNG.integers(0, 256, (h, w, 3), dtype=np.uint8), "PNG") for d, w, h in sizes
    ]
    groups = serving_requests.group_by_size(items)
    assert groups == {("AtoB", 12, 20): [0, 2], ("AtoB", 20, 12): [1], ("BtoA", 12, 20): [3]}
    outputs = service.translate(items)
    assert sorted(calls) == [
        ("AtoB", (1, 3, 20, 12)),
        ("AtoB", (2, 3, 12, 20)),
        ("BtoA", (1, 3, 12, 20)),
    ]
    assert service.stats()["batch_sizes"] == {"4": 1} and service.stats()["forwards"] == 3
    for item, out in zip(items, outputs, strict=True):
        assert out.shape == item.pixels.shape and out.dtype == np.uint8
        alone = serving_requests.translate_prepared(service.nets, [item], service.device)[0]
        assert np.abs(alone.astype(int) - out).max() <= 1  # batched = alone, within rounding


def test_the_page_names_the_endpoints_and_loads_nothing_from_elsewhere():
    page = serving_page.page_html(("AtoB", "BtoA"))
    for needed in ('"translate/"', 'href="info"', 'href="healthz"', 'type="file"', 'id="go"',
                   '<option value="AtoB">', '<option value="BtoA">', 'id="output"'):  # fmt: skip
        assert needed in page, needed
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "<link" not in page and "<script src" not in page
    only = serving_page.page_html(("BtoA",))
    assert '<option value="AtoB">' not in only and '<option value="BtoA">' in only


def test_served_output_equals_translates(tmp_path, monkeypatch):
    """The serving path and translate's Ray Data UDF, on the same in-memory generator and the
    same files: the same bytes, at the stored size and with a shorter side asked for."""
    import ray

    from pipeline.translation import Translator

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    service = tiny_service()
    net, cfg = service.nets["AtoB"], ModelConfig(ngf=8, n_blocks=1)
    payload = {"arch": dataclasses.asdict(cfg), "state": net.state_dict(), "source": "mem"}
    folder = tmp_path / "in"
    folder.mkdir()
    files = {"a.png": (23, 17, "PNG"), "b.jpg": (45, 30, "JPEG"), "c.webp": (20, 36, "WEBP")}
    for name, (w, h, fmt) in files.items():
        (folder / name).write_bytes(image_bytes(w, h, fmt, seed=w))
    batch = {
        "path": np.array([str(folder / k) for k in files], dtype=object),
        "bytes": np.array([(folder / k).read_bytes() for k in files], dtype=object),
    }
    for load_size, query in ((None, {}), (14, {"size": "14"})):
        out = tmp_path / f"out-{load_size}"
        Translator([payload], str(out), str(folder), load_size, "same", 1)(batch)
        for name in files:
            item = service.prepare("AtoB", (folder / name).read_bytes(), query)
            (served,) = service.translate([item])
            assert serving_requests.encode(served, item.format) == (out / name).read_bytes(), name


def test_settings_and_builder_arguments_are_checked():
    with pytest.raises(ValueError, match="--max-batch-size: must be >= 1"):
        ServeSettings("m", "m", ("AtoB",), max_batch_size=0)
    with pytest.raises(ValueError, match="directions"):
        ServeSettings("m", "m", ("CtoD",))
    with pytest.raises(ValueError, match="model=SOURCE"):
        serving.build_app({"direction": "AtoB"})
    with pytest.raises(ValueError, match="unknown argument.*colour"):
        serving.build_app({"model": "m", "colour": "red"})
    with pytest.raises(ValueError, match="--direction: 'sideways'"):
        serving.resolve_settings("m", "sideways")


def test_an_alias_is_pinned_to_its_version(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setattr("mlflow.tracking.context.git_context._resolve_git_info", dict)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=store)
    client.create_registered_model("m-AtoB")
    for _ in range(2):
        client.create_model_version("m-AtoB", source=str(tmp_path))
    client.set_registered_model_alias("m-AtoB", "champion", "1")
    assert serving.pin_source("models:/m-AtoB@champion", store) == "models:/m-AtoB/1"
    client.set_registered_model_alias("m-AtoB", "champion", "2")
    assert serving.pin_source("models:/m-AtoB@champion", store) == "models:/m-AtoB/2"
    assert serving.pin_source("models:/m-AtoB/1", store) == "models:/m-AtoB/1"
    assert serving.pin_source("runs:/abc", store) == "runs:/abc"
    with pytest.raises(ValueError, match="models:/m-AtoB@gone: not found"):
        serving.pin_source("models:/m-AtoB@gone", store)


def test_the_serve_config_file_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    tree = yaml.safe_load((REPO / "cluster" / "serve.yml").read_text())
    schema = ServeDeploySchema.model_validate(tree)
    (app,) = schema.applications
    assert app.import_path == "pipeline.serving:build_app" and app.name == serving.APP_NAME
    assert app.args["model"].startswith("models:/")
    # Every argument is one build_app knows: it gets as far as resolving the model.
    with pytest.raises(ValueError, match="model source") as refused:
        serving.build_app({**app.args, "tracking_uri": "sqlite:////nonexistent/x.db"})
    assert "unknown argument" not in str(refused.value)
