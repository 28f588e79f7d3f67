"""What the cluster tests share: the files under cluster/, the invariants' constants, and
helpers that read the `ray up` YAML, its commands and the IAM policies."""

from __future__ import annotations

import configparser
import copy
import ipaddress
import json
import re
import shlex
from pathlib import Path

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
