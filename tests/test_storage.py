"""Storage URIs: resolution, joins, redaction, forwarded variables and fail-fast access checks."""

from __future__ import annotations

import os
import time

import pyarrow.fs as pafs
import pytest

from pipeline import storage
from tests.conftest import free_port, set_s3_env


def _s3_settings(filesystem: pafs.S3FileSystem) -> dict:
    # pyarrow exposes the constructor arguments only through pickling support.
    return pafs.S3FileSystem.__reduce__(filesystem)[1][0]


def test_resolve_local_paths_and_file_uris(tmp_path):
    filesystem, path = storage.resolve(str(tmp_path / "a"))
    assert isinstance(filesystem, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    filesystem, path = storage.resolve(f"file://{tmp_path}/b")
    assert isinstance(filesystem, pafs.LocalFileSystem) and path == str(tmp_path / "b")
    _, path = storage.resolve("relative/dir")
    assert os.path.isabs(path) and path.endswith("relative/dir")


def test_resolve_s3_takes_endpoint_region_and_keys_from_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    filesystem, path = storage.resolve("s3://bucket/some/prefix/")
    settings = _s3_settings(filesystem)
    assert path == "bucket/some/prefix"
    assert settings["endpoint_override"] == "127.0.0.1:9000" and settings["scheme"] == "http"
    assert settings["region"] == "eu-west-1" and settings["access_key"] == "AKIAEXAMPLE"
    assert settings["connect_timeout"] <= 10

    # The S3-specific variable wins over the generic one; AWS_REGION over AWS_DEFAULT_REGION.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.example:9443")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    settings = _s3_settings(storage.resolve("s3://bucket")[0])
    assert settings["endpoint_override"] == "minio.example:9443" and settings["scheme"] == "https"
    assert settings["region"] == "us-west-2"


def test_resolve_s3_defaults_to_us_east_1_and_the_sdk_chain(monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    settings = _s3_settings(storage.resolve("s3://bucket/x")[0])
    assert settings["region"] == "us-east-1"
    assert settings["access_key"] is None and settings["endpoint_override"] == ""


def test_resolve_gs_and_bad_uris():
    filesystem, path = storage.resolve("gs://bucket/data")
    assert isinstance(filesystem, pafs.GcsFileSystem) and path == "bucket/data"
    with pytest.raises(storage.StorageError, match="unsupported scheme 'ftp'"):
        storage.resolve("ftp://host/x")
    with pytest.raises(storage.StorageError, match="no bucket"):
        storage.resolve("s3:///x")


def test_join_and_is_remote():
    assert (
        storage.join("s3://b/root/", "trainA", "part.parquet") == "s3://b/root/trainA/part.parquet"
    )
    assert storage.join("s3://b", "manifest.json") == "s3://b/manifest.json"
    assert storage.join("/data/root", "trainA") == "/data/root/trainA"
    assert storage.join("file:///data/root", "x") == "file:///data/root/x"
    assert storage.is_remote("s3://b/x") and storage.is_remote("gs://b")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")


def test_redact_masks_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEJr-token")
    text = (
        "key wJalrXUtnFEMI-K7MDENG token FwoGZXIvYXdzEJr-token secret_key=abc123 "
        "https://user:hunter2@host/x"
    )
    redacted = storage.redact(text)
    for secret in ("wJalrXUtnFEMI-K7MDENG", "FwoGZXIvYXdzEJr-token", "abc123", "hunter2"):
        assert secret not in redacted
    assert "***" in redacted and "host/x" in redacted


def test_storage_env_forwards_cloud_variables_only(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/keys/sa.json")
    monkeypatch.setenv("UNRELATED_SETTING", "x")
    env = storage.storage_env()
    assert env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:1"
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == "/keys/sa.json"
    assert "UNRELATED_SETTING" not in env and "PATH" not in env


def test_credentials_never_go_to_ray(monkeypatch):
    """Ray keeps and shows runtime environments and task specs: neither the forwarded variables
    nor a pickled filesystem carry a credential; the receiving node uses its own."""
    import pickle

    canary = "Canary-Pickled-Secret-8c1e"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIACANARYKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    monkeypatch.setenv("AWS_SESSION_TOKEN", canary + "-token")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = storage.storage_env()
    assert env["AWS_REGION"] == "eu-west-1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    data = pickle.dumps(storage.s3_filesystem())
    assert canary.encode() not in data and b"AKIACANARYKEYID" not in data
    # Unpickled on a node with credentials of its own, the filesystem takes those.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "node-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "node-secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    rebuilt = pickle.loads(data)
    assert rebuilt._kwargs["region"] == "eu-west-1" and rebuilt.max_attempts >= 10
    assert pickle.loads(pickle.dumps(rebuilt)) is not None


def test_check_access_local(tmp_path):
    with pytest.raises(storage.StorageError) as missing:
        storage.check_access(str(tmp_path / "nope"), write=False)
    assert missing.value.kind == "missing" and str(tmp_path / "nope") in str(missing.value)

    regular = tmp_path / "file.txt"
    regular.write_text("x")
    with pytest.raises(storage.StorageError) as under_file:
        storage.check_access(str(regular / "dest"), write=True)
    assert under_file.value.kind == "not_a_directory" and "file.txt/dest" in str(under_file.value)

    storage.check_access(str(tmp_path / "new" / "dir"), write=True)
    assert (tmp_path / "new" / "dir").is_dir() and not list((tmp_path / "new" / "dir").iterdir())
    storage.check_access(str(tmp_path), write=False)


@pytest.mark.integration
def test_check_access_s3(s3_env):
    storage.check_access(s3_env, write=False)
    storage.check_access(f"{s3_env}/new/prefix", write=True)
    filesystem, path = storage.resolve(s3_env)
    # pyarrow keeps an empty "directory" marker where the probe was; no file may remain.
    listing = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    assert [i.path for i in listing if i.type == pafs.FileType.File] == []

    with pytest.raises(storage.StorageError) as missing:
        storage.check_access(f"{s3_env}/no/such/prefix", write=False)
    assert missing.value.kind == "missing" and f"{s3_env}/no/such/prefix" in str(missing.value)

    with pytest.raises(storage.StorageError) as no_bucket:
        storage.check_access("s3://no-such-bucket-here/x", write=True)
    assert no_bucket.value.kind == "no_bucket" and "s3://no-such-bucket-here/x" in str(
        no_bucket.value
    )


@pytest.mark.integration
def test_check_access_unreachable_endpoint_fails_fast(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(storage.StorageError) as unreachable:
        storage.check_access(f"{s3_env}/x", write=True)
    assert unreachable.value.kind == "unreachable"
    assert f"{s3_env}/x" in str(unreachable.value) and "AWS_ENDPOINT_URL" in str(unreachable.value)
    assert time.monotonic() - start < 15


@pytest.mark.integration
def test_check_access_bad_credentials_names_uri_not_secret(s3_server_denying, monkeypatch):
    set_s3_env(monkeypatch, s3_server_denying.endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Sup3rSecretValue-xyz")
    for write in (False, True):
        with pytest.raises(storage.StorageError) as denied:
            storage.check_access("s3://some-bucket/data", write=write)
        assert denied.value.kind == "access_denied", str(denied.value)
        assert "s3://some-bucket/data" in str(denied.value)
        assert "Sup3rSecretValue-xyz" not in str(denied.value)


def test_write_bytes_atomic_leaves_no_temporary_files(tmp_path):
    filesystem, path = storage.resolve(str(tmp_path / "sub" / "manifest.json"))
    storage.write_bytes_atomic(filesystem, path, b"one")
    storage.write_bytes_atomic(filesystem, path, b"two")
    assert (tmp_path / "sub" / "manifest.json").read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["manifest.json"]


def test_worker_env_carries_tracking_and_mlflow_system_metrics_settings(monkeypatch):
    from pipeline.config import preset
    from pipeline.ray_cluster import worker_env

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")
    monkeypatch.setenv("MLFLOW_OTHER_SETTING", "x")
    env = worker_env(preset("tiny"))
    assert env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] == "2"
    assert env["MLFLOW_TRACKING_URI"] and "MLFLOW_OTHER_SETTING" not in env
