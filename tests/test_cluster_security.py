"""The security posture of the `ray up` files in cluster/, checked offline: Ray token auth on
every node and nothing turning it off, MLflow behind its basic-auth app with credentials on
every node, secrets read from outside the repo and never written into the files, and the
least-privilege IAM policies in cluster/iam/."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.cluster_files import (
    AUTOSCALER_ACTIONS,
    BUCKET_ACTIONS,
    HEAD_POLICY,
    LITERAL_SECRET,
    MAKE_SECRETS,
    MLFLOW_PERMISSIONS,
    SECRET_PATTERNS,
    STOPPED_NODE_ACTIONS,
    TRUST_POLICY,
    WORKER_LIFECYCLE_ACTIONS,
    WORKER_POLICY,
    bucket_of,
    env_value,
    flag,
    grants,
    head_volumes,
    load_policy,
    mlflow_auth_ini,
    mlflow_command,
    profile,
    ray_start,
    secret_file,
    secret_mounts,
    string_equals,
    strings,
    worker_types,
)


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
