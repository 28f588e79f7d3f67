"""The `ray up` files in cluster/: Ray's own schema, offline, plus this project's invariants
of node types, versions and the MLflow server (the security posture is in
test_cluster_security.py).

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
import re
import shlex
import subprocess

import pytest
import ray

from tests.cluster_files import (
    CLUSTER_FILES,
    GPU_FAMILY,
    KNOWN_GPU_INSTANCES,
    RAY_IMAGE,
    ROOT,
    all_commands,
    check_private_address,
    flag,
    gpu_types,
    head_volumes,
    images,
    mlflow_command,
    prepared,
    worker_types,
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
    assert any(path.startswith(v.rstrip("/") + "/") for v in head_volumes(config)), (
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
    from pipeline.ray_cluster import IDLE_WORKER_KEEP_MS

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        match = re.search(r"RAY_idle_worker_killing_time_threshold_ms=(\d+)\s", start)
        assert match, f"{key}: `ray start` without the idle-worker setting"
        assert int(match.group(1)) == IDLE_WORKER_KEEP_MS


def test_every_node_runs_workers_at_the_projects_niceness(config):
    from pipeline.ray_cluster import RAY_SYSTEM_CONFIG, WORKER_NICENESS

    assert RAY_SYSTEM_CONFIG["worker_niceness"] == WORKER_NICENESS  # a Ray started by a command
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        match = re.search(r"RAY_worker_niceness=(\d+)\s", start)
        assert match and int(match.group(1)) == WORKER_NICENESS, key


def test_a_private_ray_with_idle_helpers_ends_no_idle_worker_during_the_run():
    from pipeline import config as C
    from pipeline.ray_cluster import IDLE_WORKER_KEEP_MS, system_config

    key = "idle_worker_killing_time_threshold_ms"
    idle = C.merge(C.preset("tiny"), {"scaling": {"idle_helpers": True}})
    normal = C.merge(C.preset("tiny"), {"scaling": {"idle_helpers": False}})
    assert system_config(idle)[key] >= 7 * 24 * 3600 * 1000  # a week: the run's whole length
    assert system_config(normal)[key] == IDLE_WORKER_KEEP_MS
    assert system_config(idle)["worker_niceness"] == system_config(normal)["worker_niceness"]
