"""URI forms: the scheme of a URI, local or remote, joining parts."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

BUCKET_SCHEMES = ("s3", "gs", "gcs")
"""Object stores with buckets, reached through pyarrow's own filesystems."""
LOCAL_SCHEMES = ("", "file")
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "CYCLEGAN_S3_")


def scheme_of(uri: str) -> str:
    # A Windows drive letter ("C:\\data") is not a scheme.
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else ""


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names storage other than a local path or ``file://`` (object storage,
    an fsspec filesystem)."""
    return scheme_of(uri) not in LOCAL_SCHEMES


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended, keeping its form (local path, ``file://``, ``s3://``)."""
    scheme = scheme_of(uri)
    clean = [p.strip("/") for p in parts if p.strip("/")]
    if not scheme:
        return str(Path(uri, *clean))
    return posixpath.join(uri.rstrip("/") or uri, *clean) if clean else uri
