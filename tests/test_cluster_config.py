"""The `ray up` files in cluster/: Ray's own schema, offline, plus this project's invariants.

Validation follows the first steps of `ray up` (``_bootstrap_config``): ``prepare_config``
merges the provider's bundled defaults.yaml and the setup commands, then ``validate_config``
checks Ray's bundled JSON schema and the worker counts. Both read local files only; the steps
of `ray up` that call AWS (detecting instance resources, then creating the IAM profile, key
pair, subnets and security group) come after and are not run. Sockets are blocked while the
schema is checked, so a future Ray that reaches the network here fails the test instead of
hanging on it.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))

# vCPUs and GPUs of the instance types the cluster files name or suggest.
KNOWN_GPU_INSTANCES = {
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.12xlarge": (48, 4),
    "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1),
    "g6.2xlarge": (8, 1),
    "g6.12xlarge": (48, 4),
    "g6.48xlarge": (192, 8),
    "g6e.xlarge": (4, 1),
    "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}
GPU_FAMILY = re.compile(r"^(g\d|gr\d|p\d)")
RAY_IMAGE = re.compile(
    r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)(?:-(?P<python>py\d+))?(?:-(?P<device>\w+))?$"
)
# Commands whose output is a private address of the node they run on.
PRIVATE_ADDRESS_SOURCES = ("hostname -I", "hostname -i", "RAY_HEAD_IP", "local-ipv4")
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
SECRET_PATTERNS = {
    "an AWS access key id": re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
    "a Ray aws_credentials secret key": re.compile(r"aws_secret_access_key|aws_session_token"),
    "an AWS key variable with a value": re.compile(
        r"AWS_(?:SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)\s*[=:]\s*\S"
    ),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def load(path: Path) -> dict:
    with open(path) as handle:
        config = yaml.safe_load(handle)
    assert isinstance(config, dict), f"{path}: top level must be a mapping"
    return config


@pytest.fixture(params=CLUSTER_FILES, ids=lambda p: p.name)
def cluster_file(request) -> Path:
    return request.param


@pytest.fixture
def config(cluster_file) -> dict:
    return load(cluster_file)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during offline validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


def worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


def gpu_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in worker_types(config).items() if v["resources"].get("GPU", 0) > 0}


def all_commands(config: dict) -> list[str]:
    commands = [c for key in COMMAND_LISTS for c in config.get(key) or []]
    for node_type in config["available_node_types"].values():
        for key in ("initialization_commands", "worker_setup_commands"):
            commands += node_type.get(key) or []
    return commands


def images(config: dict) -> list[str]:
    docker = config.get("docker") or {}
    found = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for node_type in config["available_node_types"].values():
        if (node_type.get("docker") or {}).get("worker_image"):
            found.append(node_type["docker"]["worker_image"])
    return found


def flag(tokens: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` in a shell-split command (``--f v`` or ``--f=v``)."""
    for i, token in enumerate(tokens):
        for name in names:
            if token == name and i + 1 < len(tokens):
                return tokens[i + 1]
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None


def mlflow_command(config: dict) -> str:
    found = [c for c in config.get("head_start_ray_commands") or [] if "mlflow server" in c]
    assert len(found) == 1, "head_start_ray_commands must start exactly one MLflow server"
    return found[0]


def check_private_address(value: str, command: str, what: str) -> None:
    """``value`` is a private, non-loopback address, or a variable the command assigns from
    one of PRIVATE_ADDRESS_SOURCES."""
    if value.startswith("$"):
        name = value.lstrip("$").strip("{}")
        if name == "RAY_HEAD_IP":
            return
        match = re.search(rf"(?:^|[\s;]){name}=\$\((.*?)\)\s*;", command)
        assert match, f"{what}: ${name} is not assigned in the same command"
        source = match.group(1)
        assert any(s in source for s in PRIVATE_ADDRESS_SOURCES), (
            f"{what}: ${name} comes from {source!r}, not from a private address"
        )
        return
    address = ipaddress.ip_address(value.strip("[]"))
    assert address.is_private and not address.is_loopback and not address.is_unspecified, (
        f"{what}: {value} is not a private address other hosts can reach"
    )


# Ray's schema


def test_cluster_directory_has_yaml_files():
    # Without files the tests below skip (an empty parameter set); this one fails.
    assert CLUSTER_FILES, "cluster/ should hold at least one ray up file"


def test_ray_schema_accepts_the_file_offline(config, no_network):
    full = prepared(config)
    assert full["provider"]["type"] == "aws"
    assert full["head_node_type"] in full["available_node_types"]


def test_ray_schema_is_live(config, no_network):
    """A misspelt field must fail, so the schema check above is not a no-op."""
    import jsonschema

    broken = copy.deepcopy(config)
    broken["available_node_types"][broken["head_node_type"]]["resource"] = {"CPU": 0}
    with pytest.raises(jsonschema.ValidationError):
        prepared(broken)


@pytest.mark.integration  # runs bash
def test_every_command_is_valid_bash(config):
    for command in all_commands(config):
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"bash syntax error in {command!r}: {result.stderr}"


# node types


def test_head_runs_no_training(config):
    head = config["available_node_types"][config["head_node_type"]]
    resources = head["resources"]
    # CPU 0: Train workers, Ray Data tasks and Tune trials all ask for CPU, so none lands here;
    # job drivers and the Train controller ask for 0 CPU and still run.
    assert resources.get("CPU") == 0, "the head must advertise CPU 0"
    assert resources.get("GPU", 0) == 0, "the head must advertise no GPU"
    assert not GPU_FAMILY.match(head["node_config"]["InstanceType"]), "the head needs no GPU"
    for command in config.get("head_start_ray_commands") or []:
        tokens = shlex.split(command)
        for name in ("--num-cpus", "--num-gpus"):
            value = flag(tokens, name)
            assert value in (None, "0"), f"{name}={value} on the head overrides its resources"


def test_cpu_work_has_somewhere_to_run(config):
    assert any(t["resources"].get("CPU", 0) > 0 for t in worker_types(config).values()), (
        "with CPU 0 on the head, some worker type must offer CPUs"
    )


def test_gpu_worker_type(config):
    gpus = gpu_types(config)
    assert gpus, "no worker type advertises GPUs"
    for name, node_type in gpus.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers")
        assert high is not None and high >= 1, f"{name}: max_workers must be >= 1"
        assert 0 <= low <= high, f"{name}: need 0 <= min_workers <= max_workers"
        instance = node_type["node_config"]["InstanceType"]
        assert GPU_FAMILY.match(instance), f"{name}: {instance} is not a GPU instance type"
        if instance in KNOWN_GPU_INSTANCES:
            cpus, count = KNOWN_GPU_INSTANCES[instance]
            assert node_type["resources"]["GPU"] == count, f"{name}: {instance} has {count} GPUs"
            assert node_type["resources"].get("CPU", cpus) == cpus, (
                f"{name}: {instance} has {cpus} vCPUs"
            )


def test_global_max_workers_covers_every_type(config):
    total = sum(t.get("max_workers", 0) for t in worker_types(config).values())
    assert config["max_workers"] >= total, "global max_workers would cap a node type"


# software versions and installation


def test_docker_image_ray_version_equals_installed_ray(config):
    found = images(config)
    assert found, "every node should run the same pinned Ray image"
    for image in found:
        match = RAY_IMAGE.match(image)
        assert match, f"{image}: expected rayproject/ray:<version>-py3XX-<device>"
        assert match["version"] == ray.__version__, (
            f"{image}: Ray {match['version']} in the image, {ray.__version__} installed"
        )
    worker_image = config["docker"].get("worker_image") or config["docker"]["image"]
    device = RAY_IMAGE.match(worker_image)["device"] or ""
    assert device == "gpu" or re.fullmatch(r"cu\d+", device), (
        f"{worker_image}: GPU workers need a -gpu or -cu<version> image"
    )


def test_constraints_pin_the_installed_ray():
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    )
    assert pins.get("ray") == ray.__version__


def test_setup_commands_install_this_project(config):
    mounts = {remote: local for remote, local in (config.get("file_mounts") or {}).items()}
    remote = [r for r, local in mounts.items() if (ROOT / local).resolve() == ROOT]
    assert remote, "file_mounts must copy the working copy (.) to the nodes"
    target = remote[0]
    setup = config.get("setup_commands") or []
    installs = [shlex.split(c) for c in setup if "pip install" in c]
    project = [t for t in installs if target in t or f"{target}/" in t]
    assert project, f"no setup command pip-installs {target}"
    assert flag(project[0], "-c", "--constraint"), "install with the constraints file"
    assert f"{target}/constraints.txt" in " ".join(setup), "constraints come from the project"


# MLflow on the head


def test_mlflow_server_binds_a_private_address(config):
    command = mlflow_command(config)
    tokens = shlex.split(command)
    host = flag(tokens, "--host", "-h")
    assert host, "mlflow server needs --host (its default, 127.0.0.1, is unreachable)"
    assert host not in ("0.0.0.0", "::", "[::]"), "MLflow must not listen on every interface"
    check_private_address(host, command, "mlflow --host")

    allowed = flag(tokens, "--allowed-hosts")
    assert allowed, "--allowed-hosts must list the address workers use"
    entries = [e.strip() for e in allowed.split(",")]
    port = flag(tokens, "--port", "-p") or "5000"
    assert "*" not in entries, "--allowed-hosts * answers any Host header"
    assert f"{host}:{port}" in entries, "workers send Host: <private ip>:<port>"
    assert any(e.startswith(("localhost", "127.0.0.1")) for e in entries), (
        "SSH tunnels send Host: localhost:<port>"
    )


def test_mlflow_server_footprint_and_storage(config):
    command = mlflow_command(config)
    tokens = shlex.split(command)
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in tokens
    assert flag(tokens, "--workers", "-w") == "1"
    backend = flag(tokens, "--backend-store-uri")
    assert backend and backend.startswith("sqlite:////"), "an absolute SQLite path"
    path = backend[len("sqlite:///") :]
    volumes = [
        option.split()[1].split(":")[1]
        for option in (config.get("docker") or {}).get("head_run_options") or []
        if option.startswith("-v ")
    ]
    assert any(path.startswith(v.rstrip("/") + "/") for v in volumes), (
        f"{path} should live on a host volume so the database outlives the container"
    )
    assert (flag(tokens, "--artifacts-destination") or "").startswith("s3://")


def test_every_node_gets_the_tracking_uri(config):
    tokens = shlex.split(mlflow_command(config))
    port = flag(tokens, "--port", "-p") or "5000"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert len(starts) == 1, f"{key}: one `ray start`"
        match = re.search(r"MLFLOW_TRACKING_URI=http://(\S+?):(\d+)(?:\s|$)", starts[0])
        assert match, f"{key}: `ray start` must run with MLFLOW_TRACKING_URI set"
        assert match.group(2) == port, f"{key}: tracking port {match.group(2)} != {port}"
        check_private_address(match.group(1), starts[0], f"{key} MLFLOW_TRACKING_URI")
    worker_start = next(c for c in config["worker_start_ray_commands"] if "ray start" in c)
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:" in worker_start


def test_every_node_keeps_idle_data_workers(config):
    from pipeline.data import IDLE_WORKER_KEEP_MS

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        match = re.search(r"RAY_idle_worker_killing_time_threshold_ms=(\d+)\s", start)
        assert match, f"{key}: `ray start` without the idle-worker setting"
        assert int(match.group(1)) == IDLE_WORKER_KEEP_MS


# credentials and network exposure


@pytest.mark.parametrize(
    "sample",
    [
        "AKIA" + "ABCDEFGHIJKLMNOP",
        "aws_credentials: {aws_secret_access_key: x}",
        "AWS_SECRET_ACCESS_KEY=abc ray start",
        "-----BEGIN RSA PRIVATE KEY-----",
    ],
)
def test_secret_patterns_catch_samples(sample):
    assert any(p.search(sample) for p in SECRET_PATTERNS.values())


def test_no_credentials_in_the_file(cluster_file, config):
    text = cluster_file.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        match = pattern.search(text)
        assert not match, f"{cluster_file.name}: {what} at offset {match.start()}"
    assert "aws_credentials" not in config["provider"], "use instance profiles, not keys"


def test_nodes_use_instance_profiles_and_our_security_group(config):
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        profile = node_config.get("IamInstanceProfile") or {}
        assert profile.get("Arn") or profile.get("Name"), f"{name}: no IamInstanceProfile"
        # Without SecurityGroupIds, `ray up` creates a group with SSH open to 0.0.0.0/0.
        assert node_config.get("SecurityGroupIds"), f"{name}: no SecurityGroupIds"
