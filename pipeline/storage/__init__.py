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

import os
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.storage.errors import StorageError, error_kind, wrap_error
from pipeline.storage.filesystems import fsspec_filesystem, gcs_filesystem, s3_filesystem, s3_region
from pipeline.storage.listing import IMAGE_EXTENSIONS, ImageListing, list_images
from pipeline.storage.secrets import credentials_hidden, redact, storage_env
from pipeline.storage.uris import BUCKET_SCHEMES, is_remote, join, scheme_of

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageListing",
    "StorageError",
    "check_access",
    "credentials_hidden",
    "error_kind",
    "is_remote",
    "join",
    "list_images",
    "redact",
    "resolve",
    "s3_filesystem",
    "s3_region",
    "storage_env",
    "wrap_error",
    "write_bytes_atomic",
]


def resolve(uri: str, fail_fast: bool = False) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path to use with it.

    Local paths and ``file://`` give an absolute local path; ``s3://bucket/prefix`` and
    ``gs://bucket/prefix`` give ``bucket/prefix``. Object stores retry through short outages
    unless ``fail_fast``. Any other scheme goes to fsspec (see :func:`fsspec_filesystem`).
    """
    uri = str(uri)
    scheme = scheme_of(uri)
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


def _bucket_of(path: str) -> str:
    return path.split("/", 1)[0]


def check_access(uri: str, write: bool) -> None:
    """Fail fast, with a :class:`StorageError`, unless ``uri`` can be read (or written).

    Reading needs the path to exist. Writing needs the bucket to exist (object stores) and the
    folder to accept a small probe file, which is removed again.
    """
    filesystem, path = resolve(uri, fail_fast=True)
    try:
        if scheme_of(uri) in BUCKET_SCHEMES:
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
