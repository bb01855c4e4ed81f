"""One small API over a local disk and object stores (pyarrow.fs): every input and output path of the project.

A `Location` is a filesystem, a path inside it and the URI shown to users. `location()` takes a local path or a
URI (`file://`, `s3://`, `gs://`, any scheme pyarrow knows). Endpoints and credentials come from the standard
environment variables only (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, ...,
GOOGLE_APPLICATION_CREDENTIALS, ...), read by `pyarrow.fs.FileSystem.from_uri`; a bare `S3FileSystem()` would
ignore AWS_ENDPOINT_URL.

Writes are atomic: on a local disk a hidden `.<name>.tmp-<random>` sibling renamed into place, on an object store
one upload of a finished local file (an object appears only when its upload completes). A writer that fails
leaves nothing under the name, and an older file or object there as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from sentiment_ray.io.errors import InputError, one_line

ENVIRONMENT_HINT = ("endpoints and credentials come from the AWS_* (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY, AWS_REGION) or GOOGLE_* environment variables")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET_SCHEMES = {"s3", "gs", "gcs"}  # URIs of the form scheme://bucket/key: one filesystem per bucket
_COPY_CHUNK = 8 << 20


class StorageError(InputError):
    """A location that cannot be used: an unknown scheme, or a store that refuses or cannot be reached (bucket,
    credentials, endpoint). The message names the URI."""


class StoreWriteError(StorageError):
    """A store that refused to take an object (`PutObject` denied, a quota, the bucket gone). Before any work it is a
    location the user chose, exit 2 like every StorageError; during a run whose output was found writable at its
    start, `refused_mid_run` makes it the environment's OutputWriteError (exit 1)."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: could not write ({reason}); {ENVIRONMENT_HINT}")
        self.uri, self.reason = uri, reason

    def __reduce__(self):  # pickled by Ray with its two fields, not the message its __init__ does not take
        return type(self), (self.uri, self.reason)


# A full disk, a quota reached, a filesystem gone read-only: what the environment refuses in the middle of a run
# whose output location was writable when it started.
WRITE_REFUSED_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class OutputWriteError(RuntimeError):
    """Writing an output failed for a reason outside the command (WRITE_REFUSED_ERRNOS). The message names the
    location and the error; the CLI ends with it in one line and exit 1. Raised where the write was whole or not
    at all, so nothing under the final name looks complete, and a rerun (`--resume`) can finish the work."""


def write_refused(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in WRITE_REFUSED_ERRNOS


@contextmanager
def refused_mid_run() -> Iterator[None]:
    """Around the writes of a run whose output was found writable when it started: a store that refuses one now (a
    bucket policy or quota changed, credentials expired, the bucket deleted) is the environment's doing, as a full
    disk is, so it is an OutputWriteError (one line naming the object, exit 1, the work done so far kept for a
    rerun), not the StorageError (exit 2) that points at a location the user gave."""
    try:
        yield
    except StoreWriteError as exc:
        raise OutputWriteError(f"could not write {exc.uri}: {exc.reason}") from exc


def is_uri(path: str | Path) -> bool:
    """True for `scheme://...` (file:// included); a local path has no scheme."""
    return bool(_URI.match(str(path)))


def uri_path(uri: str) -> str:
    """The path that an object-store URI names inside its store (`bucket/key`), found without contacting it."""
    parts = urlsplit(uri)
    return (parts.netloc + parts.path).rstrip("/")


@dataclass(frozen=True)
class FileStat:
    size: int | None  # bytes; None for a folder
    mtime_ns: int | None  # None where the store does not say


@dataclass(frozen=True)
class Location:
    """A file or folder on a local disk or an object store. `path` is inside `filesystem` (`bucket/key` on an
    object store, an absolute path locally); `uri` is what users see (`s3://bucket/key`, `/abs/path`)."""

    filesystem: pafs.FileSystem = field(compare=False, repr=False)
    path: str
    uri: str

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> Location:
        """The folder holding this one; the root (`/`, or a bucket) is its own parent."""
        if self._is_root:
            return self
        return self._at(str(PurePosixPath(self.path).parent))

    @property
    def _is_root(self) -> bool:
        return self.path == "/" if self.is_local else "/" not in self.path

    def _at(self, path: str) -> Location:
        scheme = self.uri[: len(self.uri) - len(self.path)]  # "" locally, "s3://" on S3
        return Location(self.filesystem, path, scheme + path)

    def join(self, *parts: str) -> Location:
        """The location `parts` (relative, `/`-separated) below this one."""
        relative = PurePosixPath(*parts)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"cannot join {'/'.join(parts)!r} to {self.uri}: a path below it must be relative")
        return self._at(str(PurePosixPath(self.path) / relative))

    def relative_to(self, folder: Location) -> str:
        """This location's path below `folder`, `/`-separated."""
        return str(PurePosixPath(self.path).relative_to(folder.path))

    # ------------------------------------------------------------------------------------------ reading

    def _info(self) -> pafs.FileInfo:
        with self._errors_named("look up"):
            return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        """A folder; on an object store, a prefix that holds objects (or a folder marker)."""
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def info(self) -> FileStat:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri} does not exist")
        return FileStat(size=info.size if info.type == pafs.FileType.File else None, mtime_ns=info.mtime_ns)

    def list_files(self, recursive: bool = True) -> list[Location]:
        """The files below this folder (at any depth with `recursive`), sorted by path; [] when it is absent."""
        return [self._at(info.path) for info in self._listing(recursive) if info.type == pafs.FileType.File]

    def children(self) -> list[Location]:
        """The files and folders directly in this folder, sorted by path; [] when it is absent."""
        return [self._at(info.path) for info in self._listing(recursive=False)]

    def _listing(self, recursive: bool) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
        with self._errors_named("list"):
            if self._info().type != pafs.FileType.Directory:
                return []
            return sorted(self.filesystem.get_file_info(selector), key=lambda info: info.path)

    def read_bytes(self) -> bytes:
        with self._errors_named("read"), self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open_input(self) -> pa.NativeFile:
        """A random-access file (seekable: what `pyarrow.parquet.ParquetFile` needs); close it when done."""
        with self._errors_named("open"):
            return self.filesystem.open_input_file(self.path)

    def open_input_stream(self) -> pa.NativeFile:
        """A sequential stream: the cheapest way to read a whole file once; close it when done."""
        with self._errors_named("open"):
            return self.filesystem.open_input_stream(self.path)

    # ------------------------------------------------------------------------------------------ writing

    def write_bytes(self, data: bytes) -> Location:
        """Write `data` here atomically (see the module's doc); returns self."""
        return self.write_with(lambda stream: stream.write(data))

    def write_with(self, write: Callable[[pa.NativeFile], object]) -> Location:
        """`write(stream)` into a pyarrow output stream (`pq.write_table(table, stream)`, `stream.write(b)`), and
        the result appears here only when `write` returned: an exception leaves the old file, or none."""
        if self.is_local:
            self.parent.makedirs()
            temporary = os.path.join(self.parent.path, f".{self.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with pa.OSFile(temporary, "wb") as stream:
                    write(stream)
                os.replace(temporary, self.path)
            except OSError as exc:
                if write_refused(exc):
                    raise OutputWriteError(f"could not write {self.uri}: {one_line(exc)}") from exc
                raise
            finally:
                if os.path.lexists(temporary):
                    os.unlink(temporary)
            return self
        # An object-store output stream commits whatever was written when it is closed, also when the writer
        # raised (pyarrow's Python streams cannot abort an upload): write to a local file, upload it complete.
        with tempfile.NamedTemporaryFile(prefix="sentiment-ray-upload-") as spool:
            with pa.OSFile(spool.name, "wb") as stream:
                write(stream)
            return self.upload_file(Path(spool.name))

    def upload_file(self, local_file: Path) -> Location:
        """Copy a finished local file here, atomically (see the module's doc); returns self."""
        if self.is_local:
            return self.write_with(lambda stream: _copy_stream(pa.OSFile(str(local_file), "rb"), stream))
        # One call into Arrow's C++, which opens, copies and closes the object: a Python exception raised in this
        # thread meanwhile (ray.cancel's KeyboardInterrupt in a write task of a stopped pipeline) is seen only once
        # it returns. Copied from Python, the stream's close on that exception committed what was copied so far,
        # and a 0-byte fragment stood under its final name (seen on S3 after a lost node, issue 28).
        size = Path(local_file).stat().st_size
        with self._errors_named("write"):
            pafs.copy_files(str(local_file), self.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.filesystem, use_threads=False)
            # copy_files drops the error of the upload's last step: a store refusing the object (a bucket policy
            # denying PutObject; moto, pyarrow 26) left no object and no exception, only a line on stderr. So the
            # object is looked up, and where it is not there whole the upload runs once more through a stream,
            # whose close raises the store's own error.
            if self._stored_size() != size:
                self._upload_through_stream(Path(local_file))
                if self._stored_size() != size:
                    raise OSError(f"the store did not keep the {size}-byte object after its upload")
        return self

    def _stored_size(self) -> int | None:
        info = self.filesystem.get_file_info(self.path)
        return info.size if info.type == pafs.FileType.File else None

    def _upload_through_stream(self, local_file: Path) -> None:
        """The upload from Python, for the error copy_files drops: the store's refusal raises from the close."""
        data = local_file.read_bytes()
        stream = self.filesystem.open_output_stream(self.path)
        try:
            stream.write(data)
        except BaseException:
            # A cancel's KeyboardInterrupt (see upload_file): the close commits what was written, so what it
            # committed goes again; never a part of the file under its final name.
            with contextlib.suppress(Exception):
                stream.close()
                self.filesystem.delete_file(self.path)
            raise
        stream.close()

    def makedirs(self) -> None:
        """Create this folder and its parents; nothing on an object store, whose folders are key prefixes."""
        if self.is_local:
            self.filesystem.create_dir(self.path, recursive=True)

    def delete(self, missing_ok: bool = False) -> None:
        """Delete this file."""
        try:
            with self._errors_named("delete"):
                self.filesystem.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise FileNotFoundError(f"{self.uri} does not exist") from None

    def delete_dir(self, missing_ok: bool = False) -> None:
        """Delete this folder and everything below it (on an object store: every object under the prefix)."""
        if missing_ok and not self.exists():
            return
        try:
            with self._errors_named("delete"):
                self.filesystem.delete_dir(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise FileNotFoundError(f"{self.uri} does not exist") from None

    @contextmanager
    def _errors_named(self, action: str) -> Iterator[None]:
        """A store that refuses or cannot be reached: one StorageError naming the URI and where the settings
        come from. Locally, and for a missing file, the OSError as it is (callers test for FileNotFoundError)."""
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError as exc:
            if self.is_local:
                raise
            if action == "write":
                raise StoreWriteError(self.uri, one_line(exc)) from None
            raise StorageError(f"{self.uri}: could not {action} ({one_line(exc)}); {ENVIRONMENT_HINT}") from None


def _copy_stream(source: pa.NativeFile, destination: pa.NativeFile) -> None:
    with source:
        while chunk := source.read(_COPY_CHUNK):
            destination.write(chunk)


# ------------------------------------------------------------------------------------------ finding a location

_filesystems: dict[tuple, pafs.FileSystem] = {}
_filesystems_lock = threading.Lock()


def _store_settings() -> tuple:
    """The environment a store's filesystem was configured from: a changed endpoint or key makes a new one."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS_"))))


def _filesystem_for(uri: str, scheme: str, bucket: str, query: str) -> pafs.FileSystem:
    key = (scheme, bucket, query, _store_settings())
    with _filesystems_lock:
        if key not in _filesystems:
            _filesystems[key] = pafs.FileSystem.from_uri(uri)[0]
        return _filesystems[key]


def location(path_or_uri: str | Path | Location) -> Location:
    """A local path (`~` expanded, made absolute) or a URI as a Location. Object-store filesystems are made
    once per bucket (and environment) and shared, so that many calls do not each set up an S3 client."""
    if isinstance(path_or_uri, Location):
        return path_or_uri
    given = str(path_or_uri)
    match = _URI.match(given)
    if not match:
        local = str(Path(given).expanduser().resolve())
        return Location(pafs.LocalFileSystem(), local, local)
    scheme = match.group(1).lower()
    try:
        if scheme == "file":
            _, inner = pafs.FileSystem.from_uri(given)
            local = str(Path(inner).resolve())
            return Location(pafs.LocalFileSystem(), local, local)
        if scheme in _BUCKET_SCHEMES:
            parts = urlsplit(given)
            bucket = parts.netloc
            if not bucket:
                raise StorageError(f"{given}: names no bucket; write {scheme}://<bucket>/<path>")
            inner = uri_path(given)
            return Location(_filesystem_for(given, scheme, bucket, parts.query), inner, f"{scheme}://{inner}")
        filesystem, inner = pafs.FileSystem.from_uri(given)
    except StorageError:
        raise
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise StorageError(f"{given}: not a path or URI this tool can read or write ({one_line(exc)}); use a local "
                           "path or a file://, s3:// or gs:// URI") from None
    except OSError as exc:
        raise StorageError(f"{given}: cannot reach the store ({one_line(exc)}); {ENVIRONMENT_HINT}") from None
    inner = inner.rstrip("/") or inner
    return Location(filesystem, inner, f"{scheme}://{inner}")


# ------------------------------------------------------------------------------------------ local copies


def local_copy_of_folder(folder: Location, cache_root: Path, content_key: str,
                         check: Callable[[Path], None] | None = None) -> Path:
    """A local folder holding what `folder` holds: `folder` itself when it is local, else
    `cache_root/<content_key>/`, downloaded only when absent (once per node, whatever number of processes ask).

    `content_key` must change when the content does (the caller hashes it). The files are downloaded into a
    hidden sibling, `check(that folder)` may refuse it (raise), and it is renamed into place; a process that lost
    the race to another keeps the other's copy."""
    if folder.is_local:
        return Path(folder.path)
    final = Path(cache_root) / content_key
    if final.is_dir():
        return final
    files = folder.list_files()
    if not files:
        raise FileNotFoundError(f"{folder.uri} holds no files to copy")
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{content_key}.tmp-", dir=final.parent))
    try:
        for remote in files:
            local = temporary / remote.relative_to(folder)
            local.parent.mkdir(parents=True, exist_ok=True)
            with remote.open_input_stream() as source, pa.OSFile(str(local), "wb") as destination:
                _copy_stream(source, destination)
        if check is not None:
            check(temporary)
        try:
            temporary.rename(final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final


def upload_folder(local_folder: Path, destination: Location, last: tuple[str, ...] = ()) -> list[Location]:
    """Copy every file below `local_folder` to the same relative path below `destination`, each atomically;
    the files named in `last` (relative paths) are written after all others, in that order."""
    local_folder = Path(local_folder)
    files = sorted(str(p.relative_to(local_folder)) for p in local_folder.rglob("*") if p.is_file())
    ordered = [f for f in files if f not in last] + [f for f in last if f in files]
    return [destination.join(relative).upload_file(local_folder / relative) for relative in ordered]
