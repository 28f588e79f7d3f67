"""Serving with Ray Serve, the real app on the shared Ray head (tests marked integration): the
API, bad inputs, batching, equality with translate, the page in Chromium, and a redeploy to a new
model version behind an alias while a client keeps sending requests. Request checks in this
process are in test_serving_requests.py."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ray.train import Checkpoint

from cyclegan.networks import ResnetGenerator
from pipeline import serving, serving_requests
from pipeline.serving_requests import Prepared
from tests.sample_images import bomb_png, image_bytes

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def request(url: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET, or a POST of ``body``."""
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, res.read(), res.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("content-type", "")


@dataclasses.dataclass
class Served:
    url: str
    store: str
    run_dir: Path
    checkpoints: dict
    client: object
    env: dict
    translated: tuple[bytes, Path]
    """An image and what ``pipeline.translate`` made of it with version 1, at size 20."""


@pytest.fixture(scope="module")
def served(ray_client, tmp_path_factory):
    """The app on the shared head, serving ``models:/srv-AtoB@champion`` (version 1 of two
    registered versions, logged as training logs them); Serve is shut down afterwards."""
    from mlflow import MlflowClient
    from ray import serve

    from cyclegan.checkpoint import save_checkpoint
    from pipeline import tracking
    from pipeline.config import merge, tiny, with_defaults
    from pipeline.translation import translate
    from tests.conftest import free_port
    from tests.test_export import make_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("serve")
    store = f"sqlite:///{tmp}/mlflow.db"
    cfg = with_defaults(
        merge(tiny(), {"tracking": {"uri": store, "experiment": "serve", "register": "srv"}})
    )
    checkpoints = {}
    for version, seed in ((1, 3), (2, 4)):
        checkpoints[version] = make_tiny_checkpoint(step=version, seed=seed)
        folder = tmp / f"v{version}" / "checkpoint_000"
        save_checkpoint(checkpoints[version], folder / "checkpoint.pt")
        rid = tracking.start_run(cfg, f"serve-v{version}", {})
        tracking.log_generators(cfg, rid, Checkpoint.from_directory(str(folder)))
    client = MlflowClient(tracking_uri=store)
    client.set_registered_model_alias("srv-AtoB", "champion", "1")
    # Translated before the app takes its CPU: translate's actor takes all CPUs but one.
    photo = tmp / "in" / "x.png"
    photo.parent.mkdir()
    photo.write_bytes(image_bytes(37, 29, seed=5))
    result = translate(str(tmp / "v1"), "AtoB", str(photo.parent), str(tmp / "out"), load_size=20)
    assert result["keys"] == ["x.png"]
    settings = serving.resolve_settings(
        "models:/srv-AtoB@champion",
        tracking_uri=store,
        max_batch_size=4,
        batch_wait_ms=300,
        max_pixels=300_000,
    )
    assert settings.pinned == "models:/srv-AtoB/1"
    url = serving.run(settings, "127.0.0.1", free_port())
    try:
        yield Served(
            url, store, tmp / "v1", checkpoints, client, ray_client.env,
            (photo.read_bytes(), tmp / "out" / "x.png"),
        )  # fmt: skip
    finally:
        serve.shutdown()


def eager(state: dict, pixels: np.ndarray) -> np.ndarray:
    net = ResnetGenerator(3, 3, 8, 1).eval()
    net.load_state_dict(state)
    with torch.no_grad():
        return serving_requests.translate_prepared({"AtoB": net}, [Prepared("AtoB", pixels, "PNG")],
                                          torch.device("cpu"))[0]  # fmt: skip


@pytest.mark.integration
def test_the_api(served):
    assert request(served.url + "/healthz")[:2] == (200, b"ok\n")
    status, body, kind = request(served.url + "/info")
    info = json.loads(body)
    assert status == 200 and kind == "application/json"
    assert info["source"] == "models:/srv-AtoB@champion" and info["loaded"] == "models:/srv-AtoB/1"
    assert info["directions"] == ["AtoB", "BtoA"] and info["architecture"]["BtoA"]["ngf"] == 8
    assert info["mlflow_run_id"] and info["mlflow_link"].endswith("workflowType=machine_learning")
    for direction, fmt, query, out_fmt, size in (
        ("AtoB", "PNG", "", "PNG", (45, 30)),
        ("BtoA", "JPEG", "", "JPEG", (45, 30)),
        ("AtoB", "WEBP", "?size=16", "WEBP", (24, 16)),
        ("BtoA", "JPEG", "?format=png", "PNG", (45, 30)),
    ):
        status, body, kind = request(
            f"{served.url}/translate/{direction}{query}", image_bytes(45, 30, fmt)
        )
        assert status == 200, body[:300]
        with Image.open(io.BytesIO(body)) as img:
            assert (img.format, img.size) == (out_fmt, size)
        assert kind == serving_requests.CONTENT_TYPES[out_fmt]
    page = request(served.url + "/")
    assert page[0] == 200 and b"translate/" in page[1] and page[2].startswith("text/html")


@pytest.mark.integration
def test_bad_inputs_get_a_4xx_and_the_replica_keeps_serving(served):
    good = image_bytes(32, 24)
    cases = [
        ("/translate/AtoB", b"", 400),
        ("/translate/AtoB", image_bytes(40, 30, "JPEG")[:300], 400),
        ("/translate/AtoB", b"hello", 415),
        ("/translate/AtoB", good[:60], 400),
        ("/translate/AtoB", bomb_png(), 413),
        ("/translate/AtoB", image_bytes(700, 500), 413),  # over this server's --max-pixels
        ("/translate/CtoD", good, 404),
        ("/translate/AtoB?size=x", good, 400),
        ("/nowhere", None, 404),
        ("/translate/AtoB", None, 405),
    ]
    for path, body, status in cases:
        got, answer, kind = request(served.url + path, body)
        assert got == status, (path, answer[:300])
        assert kind == "application/json" and json.loads(answer)["error"], path
        assert request(served.url + "/translate/AtoB", good)[0] == 200, f"after {path}"


@pytest.mark.integration
def test_concurrent_requests_are_batched(served):
    before = json.loads(request(served.url + "/stats")[1])
    bodies = [image_bytes(32, 24, seed=i) for i in range(8)]
    results: list = [None] * len(bodies)

    def send(i: int) -> None:
        results[i] = request(served.url + "/translate/AtoB", bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r[0] for r in results] == [200] * len(bodies)
    after = json.loads(request(served.url + "/stats")[1])
    new = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert sum(size * n for size, n in new.items()) == len(bodies)
    assert max(size for size, n in new.items() if n) > 1, after
    # One forward per batch here: all images are of one size and direction.
    assert after["forwards"] - before["forwards"] == sum(new.values())
    # Each answer is its own image's translation, whatever batch it was in.
    v1 = served.checkpoints[1]["nets"]["G_A"]
    for body, (_, answer, _) in zip(bodies, results, strict=True):
        expected = eager(v1, np.asarray(Image.open(io.BytesIO(body)).convert("RGB")))
        got = np.asarray(Image.open(io.BytesIO(answer)))
        assert np.abs(got.astype(int) - expected).max() <= 1


@pytest.mark.integration
def test_served_output_equals_pipeline_translate(served):
    status, body, _ = request(f"{served.url}/translate/AtoB?size=20", served.translated[0])
    assert status == 200
    with Image.open(io.BytesIO(body)) as got, Image.open(served.translated[1]) as want:
        assert got.size == want.size == (26, 20)
        assert np.abs(np.asarray(got).astype(int) - np.asarray(want)).max() <= 1


@pytest.mark.integration
@pytest.mark.browser
def test_the_page_in_chromium(served, tmp_path):
    from tests.browser import chromium, wait_until

    photo = tmp_path / "photo.png"
    photo.write_bytes(image_bytes(40, 28, seed=9))
    with chromium(tmp_path) as driver:
        driver.get(served.url + "/")
        driver.find_element("id", "file").send_keys(str(photo))
        driver.find_element("css selector", "#direction option[value='BtoA']").click()
        driver.find_element("id", "go").click()
        width = wait_until(
            driver,
            lambda d: d.execute_script(
                "const i = document.getElementById('output'); return i.complete && i.naturalWidth"
            ),
            60,
            "the translated image",
        )
        assert width == 40
        assert driver.execute_script("return document.getElementById('input').naturalWidth") == 40
        assert "done in" in driver.find_element("id", "status").text


@pytest.mark.integration
def test_a_redeploy_to_the_aliased_version_drops_no_request(served):
    """The alias moves to version 2; ``python -m pipeline.serve --detach`` deploys again while a
    client keeps sending: every request is answered, first by v1, then by v2."""
    body = image_bytes(24, 20, seed=11)
    pixels = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    expected = {v: eager(served.checkpoints[v]["nets"]["G_A"], pixels) for v in (1, 2)}
    answers: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                status, out, _ = request(served.url + "/translate/AtoB", body)
            except OSError as exc:  # no answer at all: a dropped request, counted as one
                status, out = 0, repr(exc).encode()
            answers.append((status, out))

    sender = threading.Thread(target=client)
    sender.start()
    try:
        served.client.set_registered_model_alias("srv-AtoB", "champion", "2")
        port = served.url.rsplit(":", 1)[1]
        env = {**os.environ, **served.env, "MLFLOW_TRACKING_URI": served.store}
        res = subprocess.run(
            [sys.executable, "-m", "pipeline.serve", "--model", "models:/srv-AtoB@champion",
             "--port", port, "--max-batch-size", "4", "--detach"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        deadline = time.monotonic() + 120
        while json.loads(request(served.url + "/info")[1])["loaded"] != "models:/srv-AtoB/2":
            assert time.monotonic() < deadline, "version 2 never answered"
            time.sleep(0.5)
        count = len(answers)
        while len(answers) < count + 3:
            assert time.monotonic() < deadline + 120, f"no answers after version 2: {answers}"
            time.sleep(0.2)
    finally:
        stop.set()
        sender.join(120)
    statuses = [status for status, _ in answers]
    assert len(statuses) >= 10, "too few requests to say anything"
    assert statuses == [200] * len(answers), statuses
    versions = []
    for _, out in answers:
        got = np.asarray(Image.open(io.BytesIO(out))).astype(int)
        versions.append(next(v for v, e in expected.items() if np.abs(got - e).max() <= 1))
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions), versions


@pytest.mark.integration
def test_the_load_test_against_the_running_server(served, capsys):
    from pipeline.bench import serve_load

    assert serve_load.main(["--url", served.url, "--requests", "6", "--clients", "3"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 4 | 6 x 3 |"))
    assert row.endswith("| 0 |"), out  # nothing failed
    assert serve_load.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert serve_load.percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)
