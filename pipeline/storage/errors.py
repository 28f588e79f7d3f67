"""Storage errors: what went wrong (a kind the user can act on), naming the URI, never a secret."""

from __future__ import annotations

from pipeline.storage.secrets import redact

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
