"""Object storage outages: requests ride through a short one, a long one fails clearly, and a
training run loses nothing (the proxy in front of the S3 server stops and restarts)."""

from __future__ import annotations

import os
import pickle
import subprocess
import time
from pathlib import Path

import boto3
import pytest

from pipeline.storage import (
    StorageError,
    check_access,
    resolve,
    wrap_error,
    write_bytes_atomic,
)
from pipeline.storage.filesystems import RetryingS3FileSystem
from tests.cli import explain, seed_mlflow_store
from tests.conftest import S3_KEY, S3_REGION, S3_SECRET
from tests.test_train_cli import runs_of, start_train, train_cli, wait_for

OUTAGE_S = 3.0


def read_bytes(uri: str) -> bytes:
    """A whole object, read as the pipeline reads one (errors as StorageError)."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except Exception as exc:
        raise wrap_error(uri, exc, "read") from None


@pytest.mark.integration
def test_a_read_waits_out_a_short_outage(flaky_s3):
    bucket, proxy = flaky_s3
    fs, path = resolve(f"{bucket}/blob")
    write_bytes_atomic(fs, path, b"payload")
    proxy.outage(OUTAGE_S)
    t0 = time.monotonic()
    assert read_bytes(f"{bucket}/blob") == b"payload"
    assert time.monotonic() - t0 >= OUTAGE_S - 0.5  # it did wait for the server


@pytest.mark.integration
def test_a_write_waits_out_a_short_outage(flaky_s3):
    bucket, proxy = flaky_s3
    fs, path = resolve(f"{bucket}/written")
    proxy.outage(OUTAGE_S)
    t0 = time.monotonic()
    write_bytes_atomic(fs, path, b"x" * 100_000)
    assert time.monotonic() - t0 >= OUTAGE_S - 0.5
    assert read_bytes(f"{bucket}/written") == b"x" * 100_000


@pytest.mark.integration
def test_the_retry_policy_survives_pickling(flaky_s3):
    # Ray ships the filesystem to its workers by pickling it.
    bucket, proxy = flaky_s3
    fs, path = resolve(f"{bucket}/blob")
    write_bytes_atomic(fs, path, b"payload")
    copy = pickle.loads(pickle.dumps(fs))
    assert isinstance(copy, RetryingS3FileSystem) and copy.max_attempts == fs.max_attempts >= 10
    proxy.outage(OUTAGE_S)
    with copy.open_input_stream(path) as stream:
        assert stream.read() == b"payload"


@pytest.mark.integration
def test_a_long_outage_fails_naming_the_uri(flaky_s3, monkeypatch):
    bucket, proxy = flaky_s3
    monkeypatch.setenv("CYCLEGAN_S3_MAX_ATTEMPTS", "4")  # about 0.4 s of retries
    fs, path = resolve(f"{bucket}/blob")
    write_bytes_atomic(fs, path, b"payload")
    proxy.down()
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        read_bytes(f"{bucket}/blob")
    assert info.value.kind == "unreachable"
    assert f"{bucket}/blob" in str(info.value) and "cannot be reached" in str(info.value)
    assert time.monotonic() - t0 < 10


@pytest.mark.integration
def test_start_up_checks_fail_fast_while_down(flaky_s3):
    bucket, proxy = flaky_s3
    proxy.down()
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot be reached"):
        check_access(bucket, write=True)
    assert time.monotonic() - t0 < 10


def test_bad_attempts_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("CYCLEGAN_S3_MAX_ATTEMPTS", "lots")
    with pytest.raises(StorageError, match="CYCLEGAN_S3_MAX_ATTEMPTS"):
        resolve("s3://bucket/x")


# Training through the outages (real Ray, real MLflow, real S3 server behind the proxy)

CANARY = "Canary-Secret-4f1d9b7e2a"


def _moto(s3_server):
    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
    )


def _objects(s3_server, bucket: str) -> dict[str, bytes]:
    client, name = _moto(s3_server), bucket.removeprefix("s3://")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=name).get("Contents", [])]
    return {k: client.get_object(Bucket=name, Key=k)["Body"].read() for k in keys}


def _stored_steps(objects: dict[str, bytes], name: str, tmp_path: Path) -> tuple[list[int], int]:
    """The step of every whole checkpoint of run ``name`` in the bucket, and how many stored
    ``checkpoint.pt`` objects do not load (an upload that was cut off)."""
    from cyclegan.checkpoint import load_checkpoint

    keys = sorted(k for k in objects if k.startswith(f"runs/{name}/") and k.endswith(".pt"))
    assert keys, sorted(objects)
    steps, broken = [], 0
    for key in keys:
        folder = tmp_path / "stored" / key.replace("/", "_")
        folder.mkdir(parents=True)
        (folder / "checkpoint.pt").write_bytes(objects[key])
        if key + ".sha256" in objects:
            (folder / "checkpoint.pt.sha256").write_bytes(objects[key + ".sha256"])
        try:
            steps.append(load_checkpoint(folder / "checkpoint.pt")["step"])
        except ValueError:
            broken += 1
    return steps, broken


def _scenes_on(bucket: str) -> str:
    from pipeline.scenes import write_scenes

    data = f"{bucket}/data"
    write_scenes(data, size=48, train_a=24, train_b=16, test=4, seed=0)
    return data


def _tiny(data: str, storage: str, name: str, steps: int) -> list[str]:
    return ["--preset", "tiny", "--data", data, "--storage", storage, "--name", name,
            "--max-steps", str(steps), "--set", "train.checkpoint_every=5",
            "--set", "tracking.log_model=false"]  # fmt: skip


@pytest.mark.integration
def test_training_rides_through_outages_while_reading_and_uploading(
    ray_head, flaky_s3, s3_server, tmp_path, monkeypatch
):
    bucket, proxy = flaky_s3
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)  # moto accepts any key
    data = _scenes_on(bucket)
    seed_mlflow_store(tmp_path)
    env = {**os.environ, **ray_head.env, "CYCLEGAN_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # The first checkpoint upload is cut half-way and the server stays away for 3 s; then
    # the first shard read after that meets another 3 s outage.
    proxy.cut_when(b"checkpoint.pt HTTP/1.1", OUTAGE_S)
    # data.cache_mb=0: every pass reads the shards from the bucket again (the streaming path).
    args = [*_tiny(data, f"{bucket}/runs", "flaky", 30), "--set", "data.cache_mb=0"]
    proc = start_train(args, env)
    try:
        assert proxy.triggered.wait(240), "no checkpoint upload seen"
        proxy.triggered.clear()
        proxy.cut_when(b".parquet HTTP/1.1", OUTAGE_S)
        output, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert proxy.triggered.is_set(), "no shard read after the first outage"
    # A read ahead that nobody waited for may have set off the second outage just before the
    # run ended: it is over OUTAGE_S after it began.
    wait_for(lambda: proxy.outages[-1][1] > 0, OUTAGE_S + 10, "the second outage's end")
    assert len(proxy.outages) == 2 and all(end > start for start, end in proxy.outages)

    objects = _objects(s3_server, bucket)
    steps, broken = _stored_steps(objects, "flaky", tmp_path)
    assert max(steps) == 30 and broken == 0  # the cut upload was retried whole
    _, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"

    # The secret key never reached the output, the MLflow store, artifacts or the bucket.
    assert CANARY not in output
    for path in Path(tmp_path).rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    for key, body in objects.items():
        assert CANARY.encode() not in body, key


@pytest.mark.integration
def test_a_long_outage_fails_clearly_and_resume_finishes(ray_head, flaky_s3, s3_server, tmp_path):
    bucket, proxy = flaky_s3
    data = _scenes_on(bucket)
    # Few retries and no restarts: the outage outlasts them. The second checkpoint's upload
    # is cut, and the server stays away until the run has failed.
    env = {"CYCLEGAN_S3_MAX_ATTEMPTS": "3"}
    proxy.cut_when(b"checkpoint.pt HTTP/1.1", 3600, skip=1)
    args = _tiny(data, f"{bucket}/runs", "outage", 20)
    res = train_cli([*args, "--set", "scaling.max_failures=0"], tmp_path, {**ray_head.env, **env})
    assert res.returncode != 0
    assert proxy.triggered.is_set()
    assert "cannot be reached" in res.stderr and "--resume outage" in res.stderr, res.stderr[-3000:]

    proxy.up()
    res = train_cli(["--resume", "outage", "--storage", f"{bucket}/runs"], tmp_path, ray_head.env)
    assert res.returncode == 0, explain(res)
    steps, broken = _stored_steps(_objects(s3_server, bucket), "outage", tmp_path)
    # The cut-off upload left an object that does not load; the resume did not pick it and
    # finished the run from the last whole checkpoint.
    assert max(steps) == 20 and broken <= 1
    _, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


# A full disk and a store that refuses access


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs the right to mount; skipped where there is none)."""
    mount = tmp_path / "small"
    mount.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.integration
def test_a_full_disk_stops_clearly_keeping_earlier_checkpoints(ray_head, scenes, small_disk):
    from cyclegan.checkpoint import load_checkpoint

    home = small_disk.parent / "home"
    args = ["--preset", "tiny", "--data", scenes, "--storage", str(small_disk / "runs"),
            "--name", "full", "--max-steps", "400", "--set", "train.checkpoint_every=5",
            "--set", "train.num_to_keep=100", "--set", "scaling.max_failures=0",
            "--set", "tracking.log_model=false"]  # fmt: skip
    res = train_cli(args, home, ray_head.env)
    assert res.returncode != 0
    assert "no space left" in res.stderr and "--resume full" in res.stderr, res.stderr[-3000:]
    assert str(small_disk / "runs") in res.stderr

    run_dir = small_disk / "runs" / "full"
    folders = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())  # named by time
    complete, broken = [], []
    for folder in folders:
        try:
            complete.append(load_checkpoint(folder / "checkpoint.pt")["step"])
        except (ValueError, FileNotFoundError):
            broken.append(folder)
    assert complete and max(complete) < 400
    # Only the newest, the one the disk filled up on, may be cut short; every checkpoint before
    # it is kept whole: each multiple of 5 up to the last whole one is there.
    assert broken in ([], folders[-1:]), broken
    assert set(range(5, max(complete) + 1, 5)) <= set(complete), complete
    assert all(step % 5 == 0 for step in complete)


@pytest.mark.integration
def test_storage_that_refuses_access_fails_before_training(s3_server_denying, tmp_path):
    env = {
        "AWS_ENDPOINT_URL_S3": s3_server_denying.endpoint,
        "AWS_ACCESS_KEY_ID": "unknown",
        "AWS_SECRET_ACCESS_KEY": CANARY,
        "NO_PROXY": "127.0.0.1,localhost",
    }
    t0 = time.monotonic()
    res = train_cli(["--preset", "tiny", "--data", "s3://denied/data"], tmp_path, env, timeout=120)
    assert res.returncode == 2
    assert "s3://denied/data: access denied" in res.stderr, res.stderr[-2000:]
    assert CANARY not in res.stdout + res.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "checkpoints").exists()
