"""The `ray up` files in cluster/: Ray's own schema, offline, plus this project's invariants
(among them: Ray token auth and MLflow basic auth on, secrets read from outside the repo, and the
least-privilege IAM policies in cluster/iam/).

Validation follows the first steps of `ray up` (``_bootstrap_config``): ``prepare_config``
merges the provider's bundled defaults.yaml and the setup commands, then ``validate_config``
checks Ray's bundled JSON schema and the worker counts. Both read local files only; the steps
of `ray up` that call AWS (detecting instance resources, then creating the IAM profile, key
pair, subnets and security group) come after and are not run. Sockets are blocked while the
schema is checked, so a future Ray that reaches the network here fails the test instead of
hanging on it.
"""

from __future__ import annotations

import configparser
import copy
import ipaddress
import json
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
IAM = ROOT / "cluster" / "iam"
HEAD_POLICY = IAM / "head-policy.json"
WORKER_POLICY = IAM / "worker-policy.json"
TRUST_POLICY = IAM / "ec2-trust-policy.json"
MAKE_SECRETS = ROOT / "cluster" / "make-secrets.sh"
# The `ray` user's home in the rayproject/ray images: where `~/` of file_mounts lands.
CONTAINER_HOME = "/home/ray"

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
# A password, token or secret key given as a value, not read from a file or a variable at run
# time ("$(cat FILE)", "$VAR", or a printf "%s" filled from one).
LITERAL_SECRET = re.compile(r"(?i)(?:password|_token|secret_key)\s*[=:]\s*[\"']?(?!\$|%s)[^\s;\"']")
# What Ray's AWS node provider calls from the head (ray/autoscaler/_private/aws/node_provider.py).
AUTOSCALER_ACTIONS = {
    "ec2:DescribeInstances",
    "ec2:RunInstances",
    "ec2:CreateTags",
    "ec2:TerminateInstances",
    "iam:PassRole",
}
STOPPED_NODE_ACTIONS = {"ec2:StartInstances", "ec2:StopInstances"}  # cache_stopped_nodes
WORKER_LIFECYCLE_ACTIONS = {"ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"}
BUCKET_ACTIONS = {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
MLFLOW_PERMISSIONS = {"READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"}


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


def strings(node) -> list[str]:
    """Every string in a parsed YAML document, keys included (comments are gone)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [t for k, v in node.items() for t in strings(k) + strings(v)]
    if isinstance(node, list):
        return [t for v in node for t in strings(v)]
    return []


def env_value(command: str, name: str) -> str | None:
    """The value a command assigns to ``name`` (``NAME=value``), without its quotes."""
    match = re.search(rf"(?:^|[\s;]){name}=(\"[^\"]*\"|'[^']*'|[^\s;]+)", command)
    return match.group(1).strip("\"'") if match else None


def ray_start(config: dict, key: str) -> str:
    starts = [c for c in config.get(key) or [] if "ray start" in c]
    assert len(starts) == 1, f"{key}: one `ray start`"
    return starts[0]


def container_path(path: str) -> str:
    return CONTAINER_HOME + path[1:] if path.startswith("~/") else path


def repo_mount(config: dict) -> str:
    """The container path the working copy (``.``) is copied to."""
    found = [
        container_path(remote).rstrip("/")
        for remote, local in (config.get("file_mounts") or {}).items()
        if not local.startswith("~") and (ROOT / local).resolve() == ROOT
    ]
    assert found, "file_mounts must copy the working copy (.) to the nodes"
    return found[0]


def secret_mounts(config: dict) -> dict[str, str]:
    """file_mounts whose source is on the user's machine outside the repo (``~/...`` or an
    absolute path elsewhere), as {container path: local path as written}."""
    found = {}
    for remote, local in (config.get("file_mounts") or {}).items():
        outside = local.startswith("~/") or (
            Path(local).is_absolute() and not Path(local).resolve().is_relative_to(ROOT)
        )
        if outside:
            found[container_path(remote).rstrip("/")] = local
    return found


def secret_file(config: dict, value: str | None, what: str) -> str:
    """``value`` (a path, or ``$(cat PATH)``) names a file in a secret mount; returns the path."""
    assert value, f"{what} is not set"
    match = re.fullmatch(r"\$\(cat (\S+)\)", value)
    path = container_path(match.group(1) if match else value)
    assert any(path.startswith(m + "/") for m in secret_mounts(config)), (
        f"{what}: {path} is not in a file_mounts directory copied from outside the repo"
    )
    return path


def head_volumes(config: dict) -> list[str]:
    return [
        option.split()[1].split(":")[1]
        for option in (config.get("docker") or {}).get("head_run_options") or []
        if option.startswith("-v ")
    ]


def mlflow_auth_ini(config: dict) -> configparser.SectionProxy:
    command = mlflow_command(config)
    path = env_value(command, "MLFLOW_AUTH_CONFIG_PATH")
    assert path, "the MLflow server needs MLFLOW_AUTH_CONFIG_PATH (the default ini is MLflow's)"
    mount = repo_mount(config)
    assert path.startswith(mount + "/"), f"{path} should be a file of this repo ({mount})"
    ini = configparser.ConfigParser()
    assert ini.read(ROOT / path[len(mount) + 1 :]), f"{path} is not in the repo"
    assert "mlflow" in ini, f"{path}: no [mlflow] section"
    return ini["mlflow"]


def bucket_of(config: dict) -> str:
    destination = flag(shlex.split(mlflow_command(config)), "--artifacts-destination") or ""
    match = re.fullmatch(r"s3://([^/]+)(?:/.*)?", destination)
    assert match, f"--artifacts-destination {destination!r} is not an S3 URI"
    return match.group(1)


def profile(node_type: dict) -> tuple[str, str]:
    """(account, name) of a node type's instance profile ARN."""
    arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
    match = re.fullmatch(r"arn:aws:iam::([^:]+):instance-profile/(?:.*/)?([\w+=,.@-]+)", arn)
    assert match, f"{arn} is not an instance profile ARN"
    return match.group(1), match.group(2)


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def load_policy(path: Path) -> list[dict]:
    """The statements of an IAM policy document, checked for shape."""
    policy = json.loads(path.read_text())
    assert policy.get("Version") == "2012-10-17", f"{path.name}: Version 2012-10-17"
    statements = as_list(policy["Statement"])
    assert statements, f"{path.name}: no statements"
    for statement in statements:
        assert statement.get("Effect") in ("Allow", "Deny"), f"{path.name}: {statement}"
        assert "NotAction" not in statement and "NotResource" not in statement, (
            f"{path.name}: NotAction/NotResource allow everything not listed"
        )
    return statements


def grants(path: Path) -> list[tuple[str, str, dict]]:
    """(action, resource, condition) for every allowed pair of a permissions policy."""
    found = []
    for statement in load_policy(path):
        assert statement.get("Action") and statement.get("Resource"), f"{path.name}: {statement}"
        if statement["Effect"] == "Allow":
            for action in as_list(statement["Action"]):
                for resource in as_list(statement["Resource"]):
                    found.append((action, resource, statement.get("Condition") or {}))
    return found


def string_equals(condition: dict, key: str) -> str | None:
    return (condition.get("StringEquals") or {}).get(key)


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
    assert any(path.startswith(v.rstrip("/") + "/") for v in head_volumes(config)), (
        f"{path} should live on a host volume so the database outlives the container"
    )
    assert (flag(tokens, "--artifacts-destination") or "").startswith("s3://")


def test_mlflow_server_requires_a_login(config):
    command = mlflow_command(config)
    assert flag(shlex.split(command), "--app-name") == "basic-auth", (
        "mlflow server --app-name basic-auth: without it anyone in the group reads and writes"
    )
    head_setup = " ".join(config.get("head_setup_commands") or [])
    assert "mlflow[auth]" in head_setup, "the basic-auth app needs the auth extra (Flask-WTF)"

    ini = mlflow_auth_ini(config)
    assert ini.get("default_permission") in MLFLOW_PERMISSIONS
    assert ini.get("admin_username"), "the ini names the admin user"
    assert not ini.get("admin_password"), "the admin password must not be in a repo file"
    database = ini.get("database_uri") or ""
    assert database.startswith("sqlite:////"), "an absolute SQLite path for the user store"
    path = database[len("sqlite:///") :]
    assert any(path.startswith(v.rstrip("/") + "/") for v in head_volumes(config)), (
        f"{path} should live on a host volume so users outlive the container"
    )

    # Secrets come from files at start, never from the YAML.
    secret_file(
        config,
        env_value(command, "MLFLOW_AUTH_ADMIN_PASSWORD"),
        "MLFLOW_AUTH_ADMIN_PASSWORD",
    )
    secret_key = env_value(command, "MLFLOW_FLASK_SERVER_SECRET_KEY") or ""
    assert re.fullmatch(r"\$\(cat \S+\)", secret_key), (
        "MLFLOW_FLASK_SERVER_SECRET_KEY (the basic-auth app's CSRF key) is read from a file"
    )


def test_every_node_gets_mlflow_credentials(config):
    """Job drivers and Train workers log to the server as the configured user, with the
    password copied from the secrets directory into ~/.mlflow/credentials (mode 600)."""
    writers = [c for c in config.get("setup_commands") or [] if ".mlflow/credentials" in c]
    assert len(writers) == 1, "setup_commands (every node) must write ~/.mlflow/credentials"
    command = writers[0]
    assert "umask 077" in command, "the credentials file must be readable by its owner only"
    user = re.search(r"mlflow_tracking_username = (\w+)", command)
    assert user and user.group(1) == mlflow_auth_ini(config).get("admin_username")
    source = re.search(r"mlflow_tracking_password = %s\\n'\s+\"(\$\(cat \S+\))\"", command)
    assert source, "the password is filled in from a file when the command runs"
    secret_file(config, source.group(1), "the MLflow password")


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


# Ray token auth


def test_ray_token_auth_on_every_node(config):
    paths = set()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = ray_start(config, key)
        assert env_value(start, "RAY_AUTH_MODE") == "token", f"{key}: RAY_AUTH_MODE=token"
        path = env_value(start, "RAY_AUTH_TOKEN_PATH")
        assert path and path.startswith("/"), (
            f"{key}: RAY_AUTH_TOKEN_PATH must be absolute (Ray does not expand ~ in it)"
        )
        paths.add(secret_file(config, path, f"{key} RAY_AUTH_TOKEN_PATH"))
    assert len(paths) == 1, "head and workers must read the same token file"

    # Shells in the containers (`ray attach`, `ray exec 'ray status'`) get the same settings.
    options = " ".join((config.get("docker") or {}).get("run_options") or [])
    assert env_value(options, "RAY_AUTH_MODE") == "token"
    assert env_value(options, "RAY_AUTH_TOKEN_PATH") in paths


def test_nothing_turns_ray_token_auth_off(config):
    modes = [
        mode
        for text in strings(config)
        for mode in re.findall(r"RAY_AUTH_MODE[\"']?\s*[=:]\s*[\"']?(\w*)", text)
    ]
    assert modes, "RAY_AUTH_MODE is never set"
    assert set(modes) == {"token"}, f"RAY_AUTH_MODE set to {sorted(set(modes))}"


def test_secrets_come_from_outside_the_repo(config):
    mounts = secret_mounts(config)
    assert mounts, "file_mounts must copy the secrets directory from your machine"
    script = MAKE_SECRETS.read_text()
    start = ray_start(config, "head_start_ray_commands")
    used = [
        secret_file(config, env_value(start, "RAY_AUTH_TOKEN_PATH"), "the Ray token"),
        secret_file(
            config,
            env_value(mlflow_command(config), "MLFLOW_AUTH_ADMIN_PASSWORD"),
            "the MLflow password",
        ),
    ]
    for path in used:
        mount = next(m for m in mounts if path.startswith(m + "/"))
        local = mounts[mount]
        # cluster/make-secrets.sh creates exactly the files the YAML reads.
        assert local.startswith("~/") and f'"$HOME/{local[2:]}"' in script, (
            f"{MAKE_SECRETS.name} must create {local}"
        )
        assert path[len(mount) + 1 :] in script, f"{MAKE_SECRETS.name} must create {path}"
    checks = [c for c in config.get("setup_commands") or [] if "test -s" in c]
    assert checks, "setup_commands must stop `ray up` when the secrets are missing"


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


@pytest.mark.parametrize(
    "sample",
    [
        "MLFLOW_AUTH_ADMIN_PASSWORD=hunter2hunter2 mlflow server",
        "MLFLOW_TRACKING_PASSWORD='s3cret'",
        "RAY_AUTH_TOKEN=0123abcd ray start",
        "admin_password = s3cret",
        "MLFLOW_FLASK_SERVER_SECRET_KEY=abc",
    ],
)
def test_literal_secret_pattern_catches_samples(sample):
    assert LITERAL_SECRET.search(sample)


@pytest.mark.parametrize(
    "sample",
    [
        'MLFLOW_AUTH_ADMIN_PASSWORD="$(cat /home/ray/.cyclegan-cluster/mlflow_password)"',
        "RAY_AUTH_TOKEN_PATH=/home/ray/.cyclegan-cluster/ray_auth_token",
        "printf 'mlflow_tracking_password = %s' \"$(cat f)\"",
        "RAY_AUTH_TOKEN=$TOKEN",
    ],
)
def test_literal_secret_pattern_lets_references_pass(sample):
    assert not LITERAL_SECRET.search(sample)


def test_no_literal_password_or_token_in_the_file(config):
    for text in strings(config):
        match = LITERAL_SECRET.search(text)
        assert not match, (
            f"a literal secret: {text[max(0, match.start() - 20) : match.end() + 20]!r}"
        )


def test_nodes_use_instance_profiles_and_our_security_group(config):
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        profile = node_config.get("IamInstanceProfile") or {}
        assert profile.get("Arn") or profile.get("Name"), f"{name}: no IamInstanceProfile"
        # Without SecurityGroupIds, `ray up` creates a group with SSH open to 0.0.0.0/0.
        assert node_config.get("SecurityGroupIds"), f"{name}: no SecurityGroupIds"


# IAM policies (cluster/iam/)


def test_iam_policy_files_parse():
    for path in (HEAD_POLICY, WORKER_POLICY):
        assert grants(path), f"{path.name} allows nothing"
    trust = load_policy(TRUST_POLICY)
    assert all(s["Principal"] == {"Service": "ec2.amazonaws.com"} for s in trust)
    assert all(s["Action"] == "sts:AssumeRole" for s in trust)


def test_head_policy_is_least_privilege(config):
    cluster = config["cluster_name"]
    region = config["provider"]["region"]
    bucket = bucket_of(config)
    account, worker_profile = profile(next(iter(worker_types(config).values())))
    worker_role = f"arn:aws:iam::{account}:role/{worker_profile}"
    found = grants(HEAD_POLICY)
    for action, resource, condition in found:
        service, _, name = action.partition(":")
        assert action != "*" and "*" not in name, f"{action}: wildcard actions are not allowed"
        if resource == "*":
            assert service == "ec2" and name.startswith("Describe"), (
                f"{action} on every resource: only ec2 Describe calls need that"
            )
        if service == "iam":
            assert action == "iam:PassRole", f"{action}: the head only passes the worker role"
            assert resource == worker_role, f"iam:PassRole on {resource}, not {worker_role}"
            assert string_equals(condition, "iam:PassedToService") == "ec2.amazonaws.com"
        if service == "s3":
            assert resource in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"), (
                f"{action} on {resource}: only the bucket {bucket}"
            )
        if service in ("ec2", "ssm") and resource != "*":
            assert resource.split(":")[3] == region, f"{resource}: not in {region}"
        worker_tags = (
            string_equals(condition, "ec2:ResourceTag/ray-cluster-name") == cluster
            and string_equals(condition, "ec2:ResourceTag/ray-node-type") == "worker"
        )
        if action in WORKER_LIFECYCLE_ACTIONS:
            assert worker_tags, f"{action} must be limited to this cluster's workers by tags"
        if action == "ec2:CreateTags":
            at_launch = string_equals(condition, "ec2:CreateAction") == "RunInstances"
            assert at_launch or worker_tags, "ec2:CreateTags only at launch or on our workers"
        if action == "ec2:RunInstances" and ":instance/" in resource:
            assert string_equals(condition, "aws:RequestTag/ray-cluster-name") == cluster
            assert string_equals(condition, "aws:RequestTag/ray-node-type") == "worker"
        if action == "ec2:RunInstances" and ":security-group/" in resource:
            groups = {
                g
                for t in worker_types(config).values()
                for g in t["node_config"]["SecurityGroupIds"]
            }
            assert resource.rsplit("/", 1)[1] in groups, f"{resource}: not the cluster's group"

    actions = {action for action, _, _ in found}
    needed = AUTOSCALER_ACTIONS | BUCKET_ACTIONS
    if config["provider"].get("cache_stopped_nodes", True):
        needed |= STOPPED_NODE_ACTIONS
    assert needed <= actions, f"the head also needs {sorted(needed - actions)}"
    for node_type in worker_types(config).values():
        image = node_type["node_config"]["ImageId"]
        if image.startswith("resolve:ssm:"):
            parameter = f"arn:aws:ssm:{region}::parameter{image[len('resolve:ssm:') :]}"
            assert ("ssm:GetParameters", parameter) in {(a, r) for a, r, _ in found}, (
                f"launching with {image} needs ssm:GetParameters on {parameter}"
            )


def test_worker_policy_only_touches_the_bucket(config):
    bucket = bucket_of(config)
    found = grants(WORKER_POLICY)
    for action, resource, _ in found:
        assert action.startswith("s3:") and "*" not in action, f"{action}: the bucket only"
        assert resource in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"), (
            f"{action} on {resource}: only the bucket {bucket}"
        )
    actions = {action for action, _, _ in found}
    assert actions >= BUCKET_ACTIONS, f"workers also need {sorted(BUCKET_ACTIONS - actions)}"


def test_node_types_use_the_roles_the_policies_are_for(cluster_file, config):
    head = config["available_node_types"][config["head_node_type"]]
    head_profile = profile(head)
    worker_profiles = {profile(t) for t in worker_types(config).values()}
    assert len(worker_profiles) == 1, "every worker type uses the bucket-only worker profile"
    assert head_profile not in worker_profiles, "workers must not get the head's role"
    text = cluster_file.read_text()
    for path in (HEAD_POLICY, WORKER_POLICY):
        assert f"cluster/iam/{path.name}" in text, f"{cluster_file.name} should name {path.name}"
    # The placeholders in the policies are ones the YAML asks the user to fill in as well.
    for path in (HEAD_POLICY, WORKER_POLICY):
        for placeholder in set(re.findall(r"[\w-]*YOUR-[\w-]+", path.read_text())):
            assert placeholder in text, f"{path.name}: {placeholder} is not in {cluster_file.name}"
