"""Storage URIs: local paths, ``file://``, ``s3://``, ``gs://`` and any fsspec filesystem
(``hf://``, ``abfs://``, ``memory://``, ...), resolved to pyarrow filesystems.

Every other module goes through :func:`resolve`, so endpoints, regions, credentials and timeouts
are decided here once. S3-compatible servers (MinIO, moto) are reached through
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; keys come from ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN`` when set, else from pyarrow's default chain.
The S3 region comes from ``AWS_REGION``, ``AWS_DEFAULT_REGION``, then the ``region`` of the
profile (``AWS_PROFILE``, else ``default``) in the AWS config file (``AWS_CONFIG_FILE``, else
``~/.aws/config``), else ``us-east-1``; a custom endpoint takes only the variables.

Other schemes go to the fsspec filesystem registered for them (``hf://`` needs
``huggingface_hub``, ``abfs://`` needs ``adlfs``, ...), wrapped for pyarrow. Its credentials come
from the URI, fsspec's configuration or the package's own defaults (environment, token files).

Secrets never leave this module in text: :class:`StorageError` messages and anything passed
through :func:`redact` have secret values replaced by ``***``.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import posixpath
import re
import uuid
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import pyarrow.fs as pafs

BUCKET_SCHEMES = ("s3", "gs", "gcs")
"""Object stores with buckets, reached through pyarrow's own filesystems."""
LOCAL_SCHEMES = ("", "file")
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "CYCLEGAN_S3_")

CONNECT_TIMEOUT_S = 5.0
# A socket read timeout, not a limit on a whole upload, so large shards still go through.
REQUEST_TIMEOUT_S = 60.0
# Each S3 request is retried with exponential backoff (25 ms * 2**n): 10 attempts ride through
# an outage of about 25 s, 11 about 50 s. CYCLEGAN_S3_MAX_ATTEMPTS overrides it.
MAX_ATTEMPTS = 10
ATTEMPTS_ENV = "CYCLEGAN_S3_MAX_ATTEMPTS"
# Start-up checks answer in seconds when an endpoint is wrong or down.
FAIL_FAST_ATTEMPTS = 3
GCS_RETRY_LIMIT = timedelta(seconds=15)

DEFAULT_REGION = "us-east-1"
DEFAULT_AWS_CONFIG = "~/.aws/config"

SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", *SECRET_ENV_VARS)
"""Never forwarded to Ray: a key id without its secret would only break the default chain."""
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL_KEY)", re.IGNORECASE)
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)((?:secret[_-]?(?:access[_-]?)?key|session[_-]?token|password|x-amz-security-token)"
    r"[\"']?\s*[=:]\s*[\"']?)([^\s\"',;&]+)"
)
# Names of fsspec options that may hold a credential; they are never pickled.
_CREDENTIAL_OPTION = re.compile(
    r"(secret|token|password|passwd|key|credential|sas|connection_string|auth|cert)",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)([^@\s/]+)(@)", re.IGNORECASE)

# Substrings of pyarrow/AWS SDK messages, mapped to what the user should fix.
_ERROR_KINDS = (
    (
        "no_bucket",
        ("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist", "not found. To create"),
    ),
    (
        "access_denied",
        (
            "ACCESS_DENIED",
            "AccessDenied",
            "INVALID_ACCESS_KEY_ID",
            "SIGNATURE_DOES_NOT_MATCH",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "EXPIRED_TOKEN",
            "Forbidden",
            "HTTP 403",
            "Permission denied",
            "permission denied",
        ),
    ),
    (
        "unreachable",
        (
            "NETWORK_CONNECTION",
            "Could not connect",
            "Couldn't connect",
            "Could not resolve",
            "Couldn't resolve",
            "curlCode",
            "timed out",
            "Timeout",
            "Connection refused",
            "UNAVAILABLE",
        ),
    ),
    ("no_space", ("No space left on device", "Disk quota exceeded", "File too large")),
    ("not_a_directory", ("Not a directory",)),
    ("missing", ("No such file", "Path does not exist", "does not exist")),
)

_HINTS = {
    "no_bucket": "the bucket does not exist",
    "access_denied": "access denied: check the credentials (AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) and the permissions on this path",
    "unreachable": "the storage endpoint cannot be reached: check AWS_ENDPOINT_URL_S3/"
    "AWS_ENDPOINT_URL and the network",
    "no_space": "no space left at this location: free some or choose another one",
    "not_a_directory": "a parent of this path is a regular file, not a directory",
    "missing": "the path does not exist",
    "invalid": "not a usable storage URI",
    "error": "storage error",
}


class StorageError(RuntimeError):
    """A storage operation failed; ``kind`` says why, the message names the URI (never a secret).

    Kinds: ``missing``, ``access_denied``, ``unreachable``, ``no_space``, ``no_bucket``,
    ``not_a_directory``, ``invalid`` (a malformed URI) and ``error`` (anything else).
    """

    def __init__(self, uri: str, kind: str, detail: str = "") -> None:
        self.uri = redact(uri)
        self.kind = kind
        self.detail = redact(detail)
        message = f"{self.uri}: {_HINTS.get(kind, kind)}"
        if detail:
            message += f" ({self.detail})"
        super().__init__(message)


def _scheme(uri: str) -> str:
    # A Windows drive letter ("C:\\data") is not a scheme.
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else ""


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names storage other than a local path or ``file://`` (object storage,
    an fsspec filesystem)."""
    return _scheme(uri) not in LOCAL_SCHEMES


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended, keeping its form (local path, ``file://``, ``s3://``)."""
    scheme = _scheme(uri)
    clean = [p.strip("/") for p in parts if p.strip("/")]
    if not scheme:
        return str(Path(uri, *clean))
    return posixpath.join(uri.rstrip("/") or uri, *clean) if clean else uri


def _endpoint(env: dict[str, str]) -> tuple[str | None, str | None]:
    """(host:port, scheme) of a custom S3 endpoint from the environment, or (None, None)."""
    url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not url:
        return None, None
    if "://" not in url:
        return url.rstrip("/"), "https"
    parsed = urlparse(url)
    if not parsed.netloc:
        raise StorageError(url, "invalid", "AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL has no host")
    return parsed.netloc, parsed.scheme or "https"


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with this project's retry policy, which it keeps when pickled to
    Ray workers (Ray Data read tasks, Ray Train checkpoint uploads): pyarrow's own pickling
    drops the retry strategy and falls back to 3 attempts."""

    def __init__(self, max_attempts: int = MAX_ATTEMPTS, **kwargs) -> None:
        strategy = pafs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts)
        super().__init__(retry_strategy=strategy, **kwargs)
        self.max_attempts, self._kwargs = max_attempts, kwargs

    def __reduce__(self):
        # Pickled for Ray tasks and actors, whose specs Ray keeps and shows: the credentials
        # stay behind, and the receiving node uses its own (environment, profile, instance role).
        public = {k: v for k, v in self._kwargs.items() if k not in CREDENTIAL_KWARGS}
        return (_rebuild_s3, (self.max_attempts, public))


CREDENTIAL_KWARGS = ("access_key", "secret_key", "session_token")


def _rebuild_s3(max_attempts: int, kwargs: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts, **kwargs, **_credentials(os.environ))


def max_attempts(env: dict[str, str]) -> int:
    raw = env.get(ATTEMPTS_ENV, "")
    if not raw:
        return MAX_ATTEMPTS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 20:
        raise StorageError(f"${ATTEMPTS_ENV}", "invalid", f"{raw!r} is not a whole number 1-20")
    return value


def s3_filesystem(
    env: dict[str, str] | None = None, fail_fast: bool = False
) -> RetryingS3FileSystem:
    """An S3 filesystem configured from the ``AWS_*`` variables of ``env`` (default: os.environ).

    Requests retry with backoff through outages of about 25 s (``CYCLEGAN_S3_MAX_ATTEMPTS``);
    ``fail_fast`` gives up after a second or two (for start-up checks)."""
    env = dict(os.environ if env is None else env)
    endpoint, scheme = _endpoint(env)
    kwargs: dict = {
        "region": s3_region(env, custom_endpoint=bool(endpoint)),
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
        # Small objects (the manifest) then go up as one PUT instead of a multipart upload.
        "allow_delayed_open": True,
    }
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = scheme
    kwargs.update(_credentials(env))
    return RetryingS3FileSystem(FAIL_FAST_ATTEMPTS if fail_fast else max_attempts(env), **kwargs)


def s3_region(env: dict[str, str], custom_endpoint: bool = False) -> str:
    """The S3 region of the user's AWS configuration: ``AWS_REGION``, ``AWS_DEFAULT_REGION``,
    then (unless ``custom_endpoint``) the profile's ``region`` in the AWS config file, else
    us-east-1.

    Decided here, once, rather than left to pyarrow: the region travels with the filesystem to
    every Ray worker, and no EC2 metadata lookup delays a machine outside AWS."""
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        return region
    if not custom_endpoint:
        region = _profile_region(env)
    return region or DEFAULT_REGION


def _profile_region(env: dict[str, str]) -> str | None:
    """The ``region`` of the profile ``AWS_PROFILE`` (else ``default``) in the AWS config file
    (``AWS_CONFIG_FILE``, else ``~/.aws/config``), read as the AWS CLI reads it; None if the
    file, the profile or its region is absent."""
    path = os.path.expanduser(env.get("AWS_CONFIG_FILE") or DEFAULT_AWS_CONFIG)
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    parser = configparser.RawConfigParser()
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle, source=path)
    except FileNotFoundError:
        return None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise StorageError(path, "invalid", f"the AWS config file cannot be read: {exc}") from None
    except OSError as exc:
        raise wrap_error(path, exc, "read the AWS config file") from None
    # Named profiles are "[profile NAME]" sections; the default one is "[default]".
    sections = [f"profile {profile}"] + (["default"] if profile == "default" else [])
    for section in sections:
        if parser.has_option(section, "region"):
            return parser.get(section, "region").strip() or None
    return None


def _credentials(env) -> dict[str, str]:
    """Explicit keys from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and a session
    token) where both are set; else none, and the AWS SDK's default chain decides."""
    if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
        return {}
    out = {"access_key": env["AWS_ACCESS_KEY_ID"], "secret_key": env["AWS_SECRET_ACCESS_KEY"]}
    if env.get("AWS_SESSION_TOKEN"):
        out["session_token"] = env["AWS_SESSION_TOKEN"]
    return out


def gcs_filesystem(env: dict[str, str] | None = None) -> pafs.GcsFileSystem:
    """A GCS filesystem; credentials come from Google's default chain."""
    env = dict(os.environ if env is None else env)
    kwargs: dict = {"retry_time_limit": GCS_RETRY_LIMIT}
    emulator = env.get("STORAGE_EMULATOR_HOST")
    if emulator:
        parsed = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme, anonymous=True)
    return pafs.GcsFileSystem(**kwargs)


class FsspecHandler(pafs.FSSpecHandler):
    """pyarrow's handler for an fsspec filesystem, pickled (for Ray tasks and actors, whose
    specs Ray keeps and shows) as its scheme and the options its URI gave, less any that may
    hold a credential: the receiving node builds the filesystem again with its own
    credentials and fsspec configuration."""

    def __init__(self, fs, scheme: str, options: dict) -> None:
        super().__init__(fs)
        self.scheme, self.options = scheme, options

    def __reduce__(self):
        public = {k: v for k, v in self.options.items() if not _CREDENTIAL_OPTION.search(k)}
        return (_rebuild_fsspec_handler, (self.scheme, public))


def _rebuild_fsspec_handler(scheme: str, options: dict) -> FsspecHandler:
    import fsspec

    return FsspecHandler(fsspec.get_filesystem_class(scheme)(**options), scheme, options)


def _fsspec_package(scheme: str) -> tuple[str, str]:
    """(package, fsspec's install hint) for a scheme fsspec knows of but cannot import."""
    from fsspec.registry import known_implementations

    known = known_implementations.get(scheme, {})
    return known.get("class", "").split(".")[0], known.get("err", "")


def fsspec_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The fsspec filesystem registered for the scheme of ``uri``, wrapped for pyarrow, and
    the path to use with it. Raises :class:`StorageError` for a scheme no installed package
    provides, naming the package that would where fsspec knows it."""
    scheme = _scheme(uri)
    try:
        import fsspec
    except ImportError:
        raise StorageError(
            uri, "invalid", f"unsupported scheme {scheme!r}; install fsspec for other filesystems"
        ) from None
    try:
        cls = fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise StorageError(
            uri,
            "invalid",
            f"unsupported scheme {scheme!r}; use a local path, file://, s3://, gs:// or the "
            "scheme of an installed fsspec filesystem (hf://, abfs://, ...)",
        ) from None
    except ImportError as exc:
        package, hint = _fsspec_package(scheme)
        detail = f"{scheme}:// needs a package that is not installed: {hint or exc}"
        if package and package != "fsspec":
            detail += f" (pip install {package})"
        raise StorageError(uri, "invalid", detail) from None
    # As fsspec.core.url_to_fs does, keeping the URI's own options apart from those fsspec's
    # configuration adds, so only the former are pickled.
    try:
        options = cls._get_kwargs_from_urls(uri)
        fs = cls(**options)
        path = cls._strip_protocol(uri)
    except Exception as exc:
        raise wrap_error(uri, exc, f"open the {scheme}:// filesystem") from None
    return pafs.PyFileSystem(FsspecHandler(fs, scheme, options)), path


def resolve(uri: str, fail_fast: bool = False) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path to use with it.

    Local paths and ``file://`` give an absolute local path; ``s3://bucket/prefix`` and
    ``gs://bucket/prefix`` give ``bucket/prefix``. Object stores retry through short outages
    unless ``fail_fast``. Any other scheme goes to fsspec (see :func:`fsspec_filesystem`).
    """
    uri = str(uri)
    scheme = _scheme(uri)
    if not scheme:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    parsed = urlparse(uri)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(uri, "invalid", "file:// URIs must name a local absolute path")
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path)
    if scheme in BUCKET_SCHEMES:
        if not parsed.netloc:
            raise StorageError(
                uri, "invalid", f"no bucket in the URI; expected {scheme}://BUCKET/..."
            )
        path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        filesystem = s3_filesystem(fail_fast=fail_fast) if scheme == "s3" else gcs_filesystem()
        return filesystem, path
    return fsspec_filesystem(uri)


def error_kind(exc: BaseException) -> str:
    """The :class:`StorageError` kind that an exception from pyarrow or the OS stands for."""
    if isinstance(exc, StorageError):
        return exc.kind
    if isinstance(exc, PermissionError):
        return "access_denied"
    if isinstance(exc, NotADirectoryError):
        return "not_a_directory"
    text = str(exc)
    for kind, needles in _ERROR_KINDS:
        if any(needle in text for needle in needles):
            return kind
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return "error"


def wrap_error(uri: str, exc: BaseException, action: str = "") -> StorageError:
    """A :class:`StorageError` for ``exc`` raised while doing ``action`` on ``uri``."""
    if isinstance(exc, StorageError):
        return exc
    detail = f"{action}: {exc}" if action else str(exc)
    return StorageError(uri, error_kind(exc), detail)


def _bucket_of(path: str) -> str:
    return path.split("/", 1)[0]


def check_access(uri: str, write: bool) -> None:
    """Fail fast, with a :class:`StorageError`, unless ``uri`` can be read (or written).

    Reading needs the path to exist. Writing needs the bucket to exist (object stores) and the
    folder to accept a small probe file, which is removed again.
    """
    filesystem, path = resolve(uri, fail_fast=True)
    try:
        if _scheme(uri) in BUCKET_SCHEMES:
            bucket = _bucket_of(path)
            if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(uri, "no_bucket", f"bucket {bucket!r} not found")
        info = filesystem.get_file_info(path)
        if not write:
            if info.type == pafs.FileType.NotFound:
                raise StorageError(uri, "missing")
            return
        if info.type == pafs.FileType.File:
            raise StorageError(uri, "not_a_directory", "it is a file; expected a folder")
        _probe_write(filesystem, path, uri)
    except StorageError:
        raise
    except Exception as exc:  # pyarrow raises OSError subclasses with SDK text inside
        raise wrap_error(uri, exc, "write check" if write else "read check") from None


def _probe_write(filesystem: pafs.FileSystem, path: str, uri: str) -> None:
    if isinstance(filesystem, pafs.LocalFileSystem):
        filesystem.create_dir(path, recursive=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise StorageError(uri, "access_denied", "the folder is not writable")
    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
    with filesystem.open_output_stream(probe) as stream:
        stream.write(b"")
    filesystem.delete_file(probe)


def write_bytes_atomic(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so readers see either the old file or the whole new one, never a part.

    Local: a temporary file beside the target, then a rename. Object stores: one upload, which
    becomes visible only when complete.
    """
    if isinstance(filesystem, pafs.LocalFileSystem):
        parent = os.path.dirname(path)
        filesystem.create_dir(parent, recursive=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageListing(NamedTuple):
    """What :func:`list_images` found under a folder."""

    keys: list[str]
    """Image keys: sorted relative POSIX paths."""
    others: int
    """Files of other kinds."""
    skipped: list[tuple[str, str]]
    """(key, reason) of each symlink left out (local folders only)."""


def _walk_local(base: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Files under a local folder (relative POSIX paths) without leaving it: a symlink is
    followed only to a file inside the folder, a symlinked folder never (it may loop, and what
    it holds lies outside or is listed in its own place). Symlinks left out come with why."""
    root = os.path.realpath(base)
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(base, rel)) as entries:
            for entry in entries:
                key = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if os.path.commonpath([root, target]) != root:
                        skipped.append((key, f"a symlink to {target}, outside the folder"))
                    elif os.path.isdir(target):
                        skipped.append((key, "a symlinked folder (not followed)"))
                    elif os.path.isfile(target):
                        files.append(key)
                    else:
                        skipped.append((key, f"a broken symlink (to {target})"))
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(key)
                elif entry.is_file(follow_symlinks=False):
                    files.append(key)
    return files, sorted(skipped)


def list_images(folder: str) -> ImageListing:
    """The images under ``folder``; a local folder is listed without following symlinks out
    of it or into a folder (see :func:`_walk_local`)."""
    filesystem, base = resolve(folder)
    try:
        if isinstance(filesystem, pafs.LocalFileSystem):
            files, skipped = _walk_local(base)
        else:
            infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
            files = [
                posixpath.relpath(info.path, base)
                for info in infos
                if info.type == pafs.FileType.File
            ]
            skipped = []
    except Exception as exc:
        raise wrap_error(folder, exc, "list images") from None
    keys = sorted(k for k in files if k.lower().endswith(IMAGE_EXTENSIONS))
    return ImageListing(keys, len(files) - len(keys), skipped)
