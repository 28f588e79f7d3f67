"""Storage URIs: resolution, joins, redaction, forwarded variables and fail-fast access checks."""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import time
import uuid

import fsspec
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import known_implementations
from fsspec.utils import infer_storage_options
from PIL import Image

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


def test_resolve_s3_defaults_to_us_east_1_and_the_sdk_chain(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/config either
    settings = _s3_settings(storage.resolve("s3://bucket/x")[0])
    assert settings["region"] == "us-east-1"
    assert settings["access_key"] is None and settings["endpoint_override"] == ""


def test_resolve_gs_and_bad_uris():
    filesystem, path = storage.resolve("gs://bucket/data")
    assert isinstance(filesystem, pafs.GcsFileSystem) and path == "bucket/data"
    with pytest.raises(storage.StorageError, match="unsupported scheme 'nosuch'"):
        storage.resolve("nosuch://host/x")
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


# Any fsspec filesystem, through memory:// (fsspec's in-process filesystem)


MEMORY_PREFIX = f"/test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def memory_root(request):
    """A fresh folder on fsspec's in-process memory filesystem: yields ``(URI, path)``, e.g.
    ``("memory://test-1a2b3c4d/name", "/test-1a2b3c4d/name")``."""
    path = f"{MEMORY_PREFIX}/{request.node.name}"
    yield f"memory:/{path}", path
    memory = fsspec.filesystem("memory")
    if memory.exists(path):
        memory.rm(path, recursive=True)


def test_resolve_memory_uris_through_fsspec(memory_root):
    uri, base = memory_root
    filesystem, path = storage.resolve(f"{uri}/a/b.txt")
    assert isinstance(filesystem, pafs.PyFileSystem) and path == f"{base}/a/b.txt"
    filesystem.create_dir(f"{base}/a", recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(b"written through pyarrow")
    assert fsspec.filesystem("memory").cat(path) == b"written through pyarrow"
    assert storage.is_remote(uri) and storage.is_remote("hf://datasets/user/repo")
    assert storage.join(uri, "trainA", "x.png") == f"{uri}/trainA/x.png"

    with pytest.raises(storage.StorageError) as missing:
        storage.check_access(f"{uri}/nothing", write=False)
    assert missing.value.kind == "missing" and f"{uri}/nothing" in str(missing.value)
    storage.check_access(f"{uri}/out", write=True)
    assert fsspec.filesystem("memory").find(base) == [path], "the write probe is gone"


def test_prepare_from_a_memory_folder_and_read_the_shards_back(memory_root):
    from pipeline.image_import import prepare
    from pipeline.shards import read_manifest

    uri, base = memory_root
    memory = fsspec.filesystem("memory")
    source = f"{base}/images"
    written = {}
    for split, count in (("trainA", 3), ("trainB", 2), ("testA", 1)):
        for i in range(count):
            buffer = io.BytesIO()
            Image.new("RGB", (12, 8), (40 * i, 100, 7)).save(buffer, "PNG")
            written[f"{split}/sub/{i}.png"] = buffer.getvalue()
            memory.pipe(f"{source}/{split}/sub/{i}.png", buffer.getvalue())
    memory.pipe(f"{source}/trainA/notes.txt", b"not an image")

    summary = prepare(f"{uri}/images", f"{uri}/shards")
    assert {n: d["count"] for n, d in summary["datasets"].items()} == {
        "trainA": 3,
        "trainB": 2,
        "testA": 1,
    }
    manifest = read_manifest(f"{uri}/shards")
    for split in ("trainA", "trainB", "testA"):
        table = pq.read_table(manifest.shard_paths(split), filesystem=manifest.filesystem)
        rows = dict(
            zip(table.column("key").to_pylist(), table.column("image").to_pylist(), strict=True)
        )
        assert rows == {k.split("/", 1)[1]: v for k, v in written.items() if k.startswith(split)}


class PasswordMemoryFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem under a scheme whose URIs carry a user and a password, as
    ftp:// and smb:// URIs do."""

    protocol = "pwmem"

    @classmethod
    def _get_kwargs_from_urls(cls, path):
        options = infer_storage_options(path)
        return {k: options[k] for k in ("username", "password") if k in options}


def test_fsspec_filesystems_go_to_ray_without_credentials(memory_root, monkeypatch):
    """A filesystem pickled for Ray carries neither a credential from fsspec's configuration
    nor one from its URI; the receiving node rebuilds it with its own."""
    canary = "Canary-Fsspec-Secret-41d7"
    monkeypatch.setitem(fsspec.config.conf, "memory", {"token": canary})
    filesystem, path = storage.resolve(f"{memory_root[0]}/x")
    assert filesystem.handler.fs.storage_options["token"] == canary
    with filesystem.open_output_stream(path) as stream:
        stream.write(b"data")
    data = pickle.dumps(filesystem)
    assert canary.encode() not in data
    monkeypatch.setitem(fsspec.config.conf, "memory", {"token": "the-node's-own"})
    rebuilt = pickle.loads(data)
    assert rebuilt.handler.fs.storage_options["token"] == "the-node's-own"
    with rebuilt.open_input_stream(path) as stream:
        assert stream.read() == b"data"

    # (``fsspec.registry`` is the read-only view; the module holds the table itself.)
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(registry._registry, "pwmem", PasswordMemoryFileSystem)
    filesystem, _ = storage.resolve(f"pwmem://reader:{canary}@host/x")
    assert filesystem.handler.fs.storage_options["password"] == canary
    data = pickle.dumps(filesystem)
    assert canary.encode() not in data
    options = pickle.loads(data).handler.fs.storage_options
    assert options["username"] == "reader" and "password" not in options


def test_unknown_and_uninstalled_schemes_say_what_is_missing():
    with pytest.raises(storage.StorageError) as unknown:
        storage.resolve("nosuch://host/data")
    assert unknown.value.kind == "invalid" and "nosuch://host/data" in str(unknown.value)
    assert "unsupported scheme 'nosuch'" in str(unknown.value)

    uninstalled = [
        (scheme, spec["class"].split(".")[0])
        for scheme, spec in known_implementations.items()
        if not spec["class"].startswith("fsspec.")
        and importlib.util.find_spec(spec["class"].split(".")[0]) is None
    ]
    if not uninstalled:
        pytest.skip("every package fsspec knows of is installed")
    scheme, package = uninstalled[0]
    with pytest.raises(storage.StorageError) as missing:
        storage.resolve(f"{scheme}://container/data")
    message = str(missing.value)
    assert f"{scheme}://container/data" in message and f"pip install {package}" in message


# The S3 region


AWS_CONFIG = """\
[default]
region = eu-central-1

[profile work]
region = ap-southeast-2
s3 =
  max_concurrent_requests = 20

[profile bare]
output = json
"""


def _region() -> str:
    return _s3_settings(storage.resolve("s3://bucket/x")[0])["region"]


def test_s3_region_comes_from_the_aws_configuration(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _region() == "us-east-1"
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text(AWS_CONFIG)
    assert _region() == "eu-central-1"
    monkeypatch.setenv("AWS_PROFILE", "work")
    assert _region() == "ap-southeast-2"
    # The region travels with the filesystem to Ray workers.
    rebuilt = pickle.loads(pickle.dumps(storage.resolve("s3://bucket")[0]))
    assert rebuilt._kwargs["region"] == "ap-southeast-2"
    for profile in ("bare", "no-such-profile"):
        monkeypatch.setenv("AWS_PROFILE", profile)
        assert _region() == "us-east-1"

    other = tmp_path / "other-config"
    other.write_text("[profile bare]\nregion = sa-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(other))
    monkeypatch.setenv("AWS_PROFILE", "bare")
    assert _region() == "sa-east-1"

    # The variables win over the file, AWS_REGION over AWS_DEFAULT_REGION.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert _region() == "eu-west-3"
    monkeypatch.setenv("AWS_REGION", "ca-central-1")
    assert _region() == "ca-central-1"

    # A custom endpoint (MinIO, moto) takes the variables only, else us-east-1.
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    assert _region() == "us-east-1"

    other.write_text("region = nowhere\n")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    with pytest.raises(storage.StorageError) as broken:
        storage.resolve("s3://bucket")
    assert broken.value.kind == "invalid" and str(other) in str(broken.value)


@pytest.mark.integration
def test_s3_region_rule_agrees_with_the_aws_sdk(tmp_path):
    """pyarrow's S3 (the AWS SDK) reads the same region from the profile; it reads the config
    file once per process, so each case runs in a process of its own."""
    config = tmp_path / "config"
    config.write_text(AWS_CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(config), AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path))
    code = (
        "import os, pyarrow.fs as f; from pipeline import storage; "
        "print(f.S3FileSystem().region, storage.s3_region(dict(os.environ)))"
    )
    for profile, expected in (("default", "eu-central-1"), ("work", "ap-southeast-2")):
        result = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, "AWS_PROFILE": profile},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert result.stdout.split() == [expected, expected]
