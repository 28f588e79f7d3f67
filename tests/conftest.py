"""Shared fixtures, and the rule that makes the test tiers mean what they say.

Tiers: a test that starts any process (a Ray head, the moto S3 server, an MLflow server, one of
the CLIs, even ``bash -n``) or asserts a wall-clock time is marked ``integration``; every other
test (``make test-fast``, ``-m "not integration"``) runs in this process alone. The process rule
is enforced here: in an unmarked test every way of starting a process raises, ``ray.init``
refuses, and a test that connects to Ray anyway fails.

S3: a real S3-compatible server (moto's standalone server) on 127.0.0.1, started once per
session. ``s3_env`` points the AWS_* variables of one test at it and hands the test a fresh
bucket, so subprocesses started by the test (the real CLIs) reach the same server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
import torch

from tests import cluster_files

pytest_plugins = ["tests.ray_fixtures"]

# Tests send nothing beyond 127.0.0.1: MLflow's usage telemetry is off here and in every
# process the tests start (they inherit this environment).
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
# Imports that run a process, done once here before the unit tier's no-process rule is in
# force: matplotlib (which torchmetrics and MLflow load) builds its font cache on its first
# import in a new environment, running `fc-list` where fontconfig is installed (Chromium
# brings it); MLflow's import asks the platform module for the OS name.
import matplotlib.font_manager  # noqa: E402, F401
import mlflow  # noqa: E402, F401

VENV_BIN = Path(sys.executable).parent
S3_KEY, S3_SECRET, S3_REGION = "testing", "testing", "us-east-1"

# The ways a test can start a process: subprocess (and asyncio, which goes through it), fork
# (multiprocessing's default), posix_spawn and system.
PROCESS_STARTERS = (
    (subprocess.Popen, "_execute_child"),
    (os, "fork"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
    (os, "system"),
)


class ProcessInUnitTest(RuntimeError):
    """Raised where a test that is not marked ``integration`` starts a process or Ray."""


@contextlib.contextmanager
def _no_processes(item: pytest.Item):
    """Around one phase of an unmarked test: starting a process or Ray raises, and an attempt
    the code under test caught and swallowed still fails the test."""
    if item.get_closest_marker("integration"):
        yield
        return
    attempts: list[str] = []
    # Threads an earlier test's fixtures left running (Ray's, a proxy's) are not this test's.
    background = set(threading.enumerate()) - {threading.main_thread()}

    def refuse(what: str, original):
        def starter(*args, **kwargs):
            if threading.current_thread() in background:
                return original(*args, **kwargs)
            attempts.append(what)
            raise ProcessInUnitTest(
                f"{item.nodeid} starts a process ({what}): mark it integration, or keep it in "
                "this process"
            )

        return starter

    patched = [(owner, name, getattr(owner, name)) for owner, name in PROCESS_STARTERS]
    ray = sys.modules.get("ray")
    # An integration test earlier in the session may have left this process connected on
    # purpose (``ray_client``); only a connection made by this test counts.
    connected_before = ray is not None and ray.is_initialized()
    if ray is not None:
        patched.append((ray, "init", ray.init))
    for owner, name, original in patched:
        setattr(owner, name, refuse(f"{owner.__name__}.{name}", original))
    try:
        yield
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and not connected_before:
        ray.shutdown()
        attempts.append("connecting to Ray")
    if attempts:
        pytest.fail(f"{item.nodeid} is not marked integration but tried: {', '.join(attempts)}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # Setup too: a session fixture (an S3 server, the Ray head) starts in the setup of the
    # first test that asks for it.
    with _no_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _no_processes(item):
        return (yield)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """A moto server process; ``endpoint`` is its http://127.0.0.1:PORT URL."""

    def __init__(self, extra_env: dict[str, str] | None = None, timeout_s: float = 30.0) -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, **(extra_env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"moto_server did not listen on {port} in {timeout_s} s"
                    ) from None
                time.sleep(0.1)

    def create_bucket(self, name: str) -> None:
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=S3_REGION,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
        ).create_bucket(Bucket=name)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def set_s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point this test's AWS_* variables (and any subprocess it starts) at ``endpoint`` only."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_REGION", S3_REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    # A proxy configured on the machine must not swallow requests to the local server.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def s3_server():
    """One local S3 server for the whole session (moto accepts any credentials)."""
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS_* set for ``s3_server`` and a new empty bucket; yields ``s3://BUCKET``."""
    set_s3_env(monkeypatch, s3_server.endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    yield f"s3://{bucket}"


@pytest.fixture(scope="session")
def s3_server_denying():
    """A second local S3 server that checks credentials and knows none, so it denies every
    request (for access-denied paths)."""
    server = S3Server(extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in the environment, which
    every later subprocess (the CLIs under test) would inherit; undo it after each test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def flaky_s3(s3_server, monkeypatch):
    """``s3_env`` reached through a :class:`FlakyProxy` that the test can take down and bring
    back (the server keeps its data); yields ``(s3://BUCKET, proxy)``."""
    from tests.flaky_proxy import FlakyProxy

    proxy = FlakyProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    set_s3_env(monkeypatch, proxy.endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    yield f"s3://{bucket}", proxy
    proxy.close()


@pytest.fixture
def one_thread():
    """One torch thread for the test: nets this small gain nothing from intra-op threads, and
    on a busy machine waiting at the threads' barriers makes every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def running_mlflow_server(store: Path):
    """A real ``mlflow server`` (SQLite store, artifacts proxied, one worker) on a free loopback
    port; yields its URI."""
    import signal
    import urllib.request

    from tests.cli import seed_mlflow_store

    seed_mlflow_store(store)
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
           "--artifacts-destination", str(store / "artifacts")]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(uri + "/health", timeout=2).status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the MLflow server did not come up (exit {proc.poll()})")
            time.sleep(0.3)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow server for one test, its store and artifacts under ``tmp_path/server``."""

    class Server:
        pass

    with running_mlflow_server(tmp_path / "server") as uri:
        server = Server()
        server.uri = uri
        yield server


# The cluster files (tests/test_cluster_config.py, tests/test_cluster_security.py)


@pytest.fixture(params=cluster_files.CLUSTER_FILES, ids=lambda p: p.name)
def cluster_file(request) -> Path:
    return request.param


@pytest.fixture
def config(cluster_file) -> dict:
    return cluster_files.load(cluster_file)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during offline validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
