"""Secrets in text and in the environment: masked in every message, never forwarded to Ray."""

from __future__ import annotations

import contextlib
import os
import re

SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", *SECRET_ENV_VARS)
"""Never forwarded to Ray: a key id without its secret would only break the default chain."""
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL_KEY)", re.IGNORECASE)
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)((?:secret[_-]?(?:access[_-]?)?key|session[_-]?token|password|x-amz-security-token)"
    r"[\"']?\s*[=:]\s*[\"']?)([^\s\"',;&]+)"
)
# Names of fsspec options that may hold a credential; they are never pickled.
CREDENTIAL_OPTION = re.compile(
    r"(secret|token|password|passwd|key|credential|sas|connection_string|auth|cert)",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)([^@\s/]+)(@)", re.IGNORECASE)


FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "CYCLEGAN_S3_")


def redact(text: str) -> str:
    """``text`` with secret values (from the environment, ``key=value`` pairs, URLs) masked."""
    if not text:
        return text
    secrets = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    secrets |= {
        value
        for name, value in os.environ.items()
        if _SECRET_NAME.search(name) and name.startswith(FORWARDED_ENV_PREFIXES + ("MLFLOW_",))
    }
    # Longest first, so a secret that contains another is masked whole.
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _SECRET_ASSIGNMENT.sub(r"\1***", text)
    return _URL_USERINFO.sub(r"\1***\3", text)


@contextlib.contextmanager
def credentials_hidden():
    """This process's AWS credential variables taken out of its environment for the block.

    Ray Tune copies them from the driver's environment into every trial's runtime
    environment, which Ray writes to its logs; trials use their node's own credentials
    instead. Filesystems built before the block keep theirs."""
    saved = {k: os.environ.pop(k) for k in CREDENTIAL_ENV_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def storage_env() -> dict[str, str]:
    """The ``AWS_*``/``GOOGLE_*``/``GCS_*`` settings (and ``STORAGE_EMULATOR_HOST``) of this
    process that workers need to reach the same storage (region, endpoint, retries), for a
    Ray runtime environment. Credentials are left out: Ray keeps and shows runtime
    environments, so every node uses its own (its environment, profile or instance role; a
    local Ray started by a command inherits the command's)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(FORWARDED_ENV_PREFIXES)
        and k not in CREDENTIAL_ENV_VARS
        and not _SECRET_NAME.search(k)
    }
    if "STORAGE_EMULATOR_HOST" in os.environ:
        env["STORAGE_EMULATOR_HOST"] = os.environ["STORAGE_EMULATOR_HOST"]
    return env
