"""The filesystems behind remote URIs: S3 (and S3-compatible servers), GCS, and any fsspec
filesystem, each configured here once (endpoint, region, credentials, timeouts, retries) and
pickled to Ray workers without their credentials."""

from __future__ import annotations

import configparser
import os
from datetime import timedelta
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.storage.errors import StorageError, wrap_error
from pipeline.storage.secrets import CREDENTIAL_OPTION
from pipeline.storage.uris import scheme_of

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
        public = {k: v for k, v in self.options.items() if not CREDENTIAL_OPTION.search(k)}
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
    scheme = scheme_of(uri)
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
