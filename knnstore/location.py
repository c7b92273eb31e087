"""Where a store lives: a local directory, or a prefix on an object store (``s3://``,
``gs://``, ``az://``), and the few file operations knnstore does there itself.

Lance reads and writes the pairs table at either (its own object-store client, configured
by the standard environment variables or ``storage_options``). knnstore's own files (the
marker, and the listing of the table's files for ``check`` and ``stats``) go through the
local file system or pyarrow's file system for the same URI, given the same credentials
and endpoint: one ``Location`` carries both.

Credentials are never written anywhere: a store's marker records no storage option, so
every command on a remote store needs them again (environment or ``--storage-option``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .errors import InputError, StorageError, first_line

REMOTE_SCHEMES = ("s3", "gs", "az")  # the object stores Lance supports
# pyarrow's file system names for them (Azure Blob: "abfs")
_PYARROW_SCHEMES = {"s3": "s3", "gs": "gs", "az": "abfs"}

# storage options (Lance's names, lower case) that pyarrow's S3 file system takes too
_S3_KEYS = {
    "aws_access_key_id": "access_key", "access_key_id": "access_key",
    "aws_secret_access_key": "secret_key", "secret_access_key": "secret_key",
    "aws_session_token": "session_token", "session_token": "session_token",
    "aws_region": "region", "region": "region",
}
_S3_ENDPOINT_KEYS = ("aws_endpoint", "aws_endpoint_url", "endpoint", "endpoint_url")


def is_remote(given: str | os.PathLike) -> bool:
    """Whether ``given`` names an object-store location (``s3://...``) rather than a path."""
    return isinstance(given, str) and urlparse(given).scheme.lower() in REMOTE_SCHEMES


def parse_storage_options(items) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--storage-option``) as a dict; keys lower case, as Lance
    takes them. A malformed item is an InputError."""
    options: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise InputError(f"--storage-option takes KEY=VALUE (e.g. aws_region=us-east-1), got {item!r}")
        options[key.strip().lower()] = value
    return options


@dataclass(frozen=True)
class Location:
    """A store's place: ``uri`` is a local path (as given) or ``scheme://bucket/prefix``."""

    uri: str
    storage_options: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, given: "str | os.PathLike | Location", storage_options: dict[str, str] | None = None) -> "Location":
        """A store location from what a user gave: a path, or a URI with an object-store
        scheme. A local path may not contain '?' (LanceDB would read it as a URL query and
        write elsewhere)."""
        if isinstance(given, Location):
            return given if storage_options is None else cls(given.uri, dict(storage_options))
        options = dict(storage_options or {})
        keys = {_S3_KEYS[k] for k in options if k in _S3_KEYS}
        if ("access_key" in keys) != ("secret_key" in keys):
            given_key, missing = (("aws_access_key_id", "aws_secret_access_key") if "access_key" in keys
                                  else ("aws_secret_access_key", "aws_access_key_id"))
            raise InputError(f"--storage-option {given_key} needs {missing} too: give both, or neither (then "
                             "the environment's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
        if is_remote(given):
            parsed = urlparse(str(given))
            if not parsed.netloc:
                raise InputError(f"{given}: an object-store URI names a bucket, e.g. s3://bucket/prefix")
            if parsed.query or parsed.fragment:
                raise InputError(f"{given}: a store URI cannot contain '?' or '#'; pick a prefix without them")
            prefix = parsed.path.strip("/")
            uri = f"{parsed.scheme.lower()}://{parsed.netloc}" + (f"/{prefix}" if prefix else "")
            return cls(uri, options)
        if isinstance(given, str) and "://" in given:
            scheme = given.split("://", 1)[0]
            raise InputError(f"{given}: knnstore stores live in a local directory or on "
                             f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}, not {scheme}://")
        path = Path(given)  # as given (messages show it so); checked in full
        if "?" in str(path.absolute()):
            raise InputError(f"{given}: a store path cannot contain '?' (LanceDB reads it as the start of a "
                             "URL query and would write elsewhere); pick a path without it")
        return cls(str(path), options)

    def __str__(self) -> str:
        return self.uri

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    @property
    def path(self) -> Path:
        """The local directory (a remote location has none: check ``remote`` first)."""
        if self.remote:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.uri)

    def child(self, name: str) -> "Location":
        return Location(f"{self.uri.rstrip('/')}/{name}", self.storage_options)

    # --- for Lance --------------------------------------------------------------------

    def lance_options(self) -> dict[str, str] | None:
        """The storage options to give Lance (None where there are none): the given ones,
        plus ``allow_http`` where the endpoint is plain http:// (a local S3-compatible
        server) and the user did not say otherwise."""
        if not self.remote:
            return None
        options = dict(self.storage_options)
        endpoint = self._endpoint()
        if endpoint and endpoint.startswith("http://") and "allow_http" not in options \
                and "AWS_ALLOW_HTTP" not in os.environ:
            options["allow_http"] = "true"
        return options or None

    def _endpoint(self) -> str | None:
        for key in _S3_ENDPOINT_KEYS:
            if key in self.storage_options:
                return self.storage_options[key]
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") \
            or os.environ.get("AWS_ENDPOINT")

    # --- knnstore's own files -----------------------------------------------------------

    def _filesystem(self):
        """(pyarrow file system, path in it) for a remote location."""
        import pyarrow.fs as pafs

        scheme, rest = self.uri.split("://", 1)
        if scheme == "s3":
            kwargs = {_S3_KEYS[k]: v for k, v in self.storage_options.items() if k in _S3_KEYS}
            endpoint = self._endpoint()
            if endpoint:
                parsed = urlparse(endpoint)
                kwargs["endpoint_override"] = parsed.netloc or endpoint
                kwargs["scheme"] = parsed.scheme or "https"
            return pafs.S3FileSystem(**kwargs), rest
        try:
            fs, path = pafs.FileSystem.from_uri(f"{_PYARROW_SCHEMES[scheme]}://{rest}")
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot reach {self.uri} ({first_line(exc)}): check the credentials "
                             "in the environment") from None
        return fs, path

    def _remote_call(self, what: str, fn):
        try:
            return fn()
        except OSError as exc:
            raise StorageError(f"cannot {what} {self.uri} ({first_line(exc)}): check that the object "
                               "store is reachable and the credentials and endpoint are right "
                               "(environment, or --storage-option)") from None

    def exists(self) -> bool:
        """Whether anything is at this location (a directory, a file, objects under it)."""
        if not self.remote:
            return self.path.exists()
        return not self.is_empty()

    def is_empty(self) -> bool:
        """Absent, or an empty directory / prefix (a new store may be made there)."""
        if not self.remote:
            return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))
        import pyarrow.fs as pafs

        fs, base = self._filesystem()
        found = self._remote_call("list", lambda: fs.get_file_info(
            pafs.FileSelector(base, recursive=False, allow_not_found=True)))
        return not found

    def file_exists(self, name: str) -> bool:
        if not self.remote:
            return (self.path / name).is_file()
        import pyarrow.fs as pafs

        fs, base = self._filesystem()
        info = self._remote_call("read", lambda: fs.get_file_info(f"{base}/{name}"))
        return info.type == pafs.FileType.File

    def read_text(self, name: str) -> str:
        if not self.remote:
            return (self.path / name).read_text(encoding="utf-8")
        fs, base = self._filesystem()

        def read() -> bytes:
            with fs.open_input_stream(f"{base}/{name}") as stream:
                return stream.read()
        return self._remote_call("read", read).decode("utf-8")

    def write_text(self, name: str, text: str) -> None:
        """Write a small file atomically: a temp file renamed over it locally; one PUT on an
        object store (a PUT replaces an object whole, never in part)."""
        if not self.remote:
            tmp = self.path / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.path / name)
            return
        fs, base = self._filesystem()

        def write() -> None:
            with fs.open_output_stream(f"{base}/{name}") as stream:
                stream.write(text.encode("utf-8"))
        self._remote_call("write", write)

    def remove_all(self) -> None:
        """Delete everything at this location (a failed init's leftovers)."""
        if not self.remote:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        fs, base = self._filesystem()
        try:
            fs.delete_dir_contents(base, missing_dir_ok=True)
        except OSError:
            pass  # best effort: an unreachable store is reported by the error that got us here

    def files(self, under: str = "") -> dict[str, int]:
        """Every file under this location (or its subdirectory ``under``): relative path ->
        bytes. Files removed while listing are left out."""
        if not self.remote:
            root = self.path / under if under else self.path
            found: dict[str, int] = {}
            for dirpath, _dirs, names in os.walk(root):
                for n in names:
                    full = os.path.join(dirpath, n)
                    try:
                        found[os.path.relpath(full, root)] = os.path.getsize(full)
                    except OSError:  # removed while we walked (a concurrent cleanup)
                        pass
            return found
        import pyarrow.fs as pafs

        fs, base = self._filesystem()
        root = f"{base}/{under}".rstrip("/") if under else base
        infos = self._remote_call("list", lambda: fs.get_file_info(
            pafs.FileSelector(root, recursive=True, allow_not_found=True)))
        return {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


# what Lance's and pyarrow's object-store clients say when the store cannot be reached
_STORE_FAILURES = ("Failed to get AWS credentials", "credentials", "Generic S3 error", "Generic GCS error",
                   "Generic MicrosoftAzure error",
                   "error sending request", "Connection refused", "Could not connect", "NETWORK_CONNECTION",
                   "dispatch failure", "operation timed out")


def storage_failure(exc: BaseException) -> str | None:
    """If ``exc`` is an object store failing (unreachable, refusing), the line saying so;
    else None (other errors keep their own handling)."""
    if isinstance(exc, StorageError):
        return str(exc)
    if not isinstance(exc, (OSError, RuntimeError, ValueError)):
        return None
    text = str(exc)
    for marker in _STORE_FAILURES:
        if marker in text:
            return text[text.index(marker):].splitlines()[0][:300]
    return None

