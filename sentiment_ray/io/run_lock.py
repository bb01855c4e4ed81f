"""One run at a time per output, however its path is spelled: a lock that a live run holds and a dead one cannot
keep for long.

Two `score` runs into the same output would both write its work units and race at the commit, and one's
`--overwrite` would delete the other's work. `lock_for_output` first turns the output into one canonical name
(`~` expanded, relative made absolute, symlinks followed, `file://` dropped; on an object store the scheme and
key normalised), so `out/`, `./out`, `~/x/out`, a symlink to it and `file:///…/out` all take the same lock.

- **Local disk**: an advisory `flock` on a hidden sibling of the output (`.<name>.lock`). The kernel releases it
  when the holding process dies, however it dies (SIGKILL, OOM, a lost terminal), so a crashed run never blocks
  its own `--resume`. flock works on local disks and on NFSv4 (Linux maps it onto POSIX byte-range locks there).
- **Object store** (`s3://`, `gs://`): a lock object `.<name>.lock` beside the output, created with a
  conditional write (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`), so exactly one of two runs creates it.
  It holds a lease: a heartbeat thread rewrites it (conditionally on its own last version) every quarter of the
  lease, and a lock whose last write is older than the lease (a crashed run's) is taken over, again
  conditionally. A run that stalled beyond its lease and lost the lock finds out at its heartbeat or at the
  commit (`verify`) and stops without writing its manifest.
- **A store without conditional writes** (or no client library for it): the lock object is written only where
  none with a live lease exists, and read back after a settling pause; of two runs that wrote at once only the
  one whose write is there afterwards goes on, and the other is refused before it deletes anything.

The lock is taken before anything in the output is read or deleted and removed when the run ends; it records who
holds it, for the message the second run gets.
"""

from __future__ import annotations

import email.utils
import fcntl
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from sentiment_ray.io.outputs import OutputExistsError, OutputNotWritableError, check_writable, resolve_output
from sentiment_ray.io.storage import is_uri, location

logger = logging.getLogger(__name__)

# How long an object-store lock outlives a run that stopped renewing it (a crash, a lost network). A rerun or
# --resume within that time is refused naming the holder; after it, the lock is taken over.
LEASE_SECONDS = float(os.environ.get("SENTIMENT_RAY_LOCK_LEASE_SECONDS", "120"))
SETTLE_SECONDS = 2.0  # stores without conditional writes: how long two writers' races take to settle
CONDITIONAL_SETTLE_SECONDS = 0.25  # stores with them: only a server's own check-then-write window


class OutputLockedError(OutputExistsError):
    """Another live run holds the output."""


def lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


def canonical_output(output: str | Path) -> str:
    """The one spelling of an output that every other spelling of it maps to: an absolute local path with `~`,
    `..` and symlinks resolved (`file://` URIs included), or `scheme://bucket/key` without repeated or trailing
    slashes (`gcs://` written `gs://`)."""
    given = str(output)
    if not is_uri(given) or given.lower().startswith("file://"):
        return location(given).path
    parts = urlsplit(given)
    scheme = {"gcs": "gs"}.get(parts.scheme.lower(), parts.scheme.lower())
    # `..` too: a store may keep `x/../out` as a key of its own, but taking its lock for `out` only refuses more.
    key = posixpath.normpath("/" + parts.path.lstrip("/")).lstrip("/")
    return f"{scheme}://{parts.netloc}/{key}".rstrip("/")


def lock_for_output(output: str | Path) -> RunLock | StoreRunLock:
    """The lock of `output`, however it is spelled (see the module's doc). Local outputs are checked first:
    the home folder or a root is refused before a lock file lands beside it, an unwritable location gets one
    clear line rather than the lock file's PermissionError."""
    location(output)  # an unusable URI (ftp://, no bucket) is refused naming the output, not its lock
    canonical = canonical_output(output)
    if not is_uri(canonical):
        final = resolve_output(canonical)
        check_writable(final)
        return RunLock(final)
    from sentiment_ray.io.outputs import _refuse_bucket_root

    _refuse_bucket_root(canonical)
    return StoreRunLock(canonical, _store_for(canonical))


class RunLock:
    """`with RunLock(final): ...` — refuses with OutputLockedError while another live process holds `final`."""

    def __init__(self, final: Path):
        self.final = final
        self.path = lock_path(final)
        self._fd: int | None = None

    @classmethod
    def for_output(cls, output: str | Path) -> RunLock | StoreRunLock:
        return lock_for_output(output)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise OutputLockedError(
                    f"another run is writing into {self.final} ({holder}); wait for it to finish, or stop it and "
                    "rerun with --resume") from None
            # The holder before us may have removed the file between our open and our flock: then we locked an
            # orphaned inode that nobody else will see, so start over on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder_record()).encode())
        self._fd = fd
        return self

    def verify(self) -> None:
        """A held flock cannot be lost while the process lives: nothing to check."""

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked while still locked: see the inode check in acquire
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            return _describe(json.loads(os.read(fd, 4096) or b"{}"))
        except (OSError, ValueError):
            return "its process details are unknown"

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _holder_record(**extra) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra}


def _describe(info: dict) -> str:
    try:
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (KeyError, TypeError):
        return "its process details are unknown"


# ------------------------------------------------------------------------------------------ object stores


@dataclass(frozen=True)
class LockVersion:
    """A lock object as read from the store: its content, the version a conditional write names, and how many
    seconds ago (by the store's own clock, so that the hosts' clocks do not matter) it was last written."""

    record: dict
    version: str
    age_seconds: float


class LockStore:
    """How a lock object is written and read. The base class has no conditional write: `create` and `replace`
    write unconditionally and `StoreRunLock` reads back after SETTLE_SECONDS."""

    conditional = False

    def __init__(self, key_uri: str):
        self.key_uri = key_uri
        self._location = location(key_uri)

    def read(self) -> LockVersion | None:
        try:
            data = self._location.read_bytes()
            info = self._location.info()
        except FileNotFoundError:
            return None
        age = time.time() - info.mtime_ns / 1e9 if info.mtime_ns else 0.0
        return LockVersion(_parse(data), str(info.mtime_ns), age)

    def create(self, body: bytes) -> str | None:
        """Write the lock where none exists; its version, or None when another run's is there."""
        self._location.write_bytes(body)
        return "unconditional"

    def replace(self, body: bytes, version: str) -> str | None:
        """Write the lock over `version` of it; the new version, or None when it changed meanwhile."""
        self._location.write_bytes(body)
        return "unconditional"

    def delete(self, version: str) -> None:
        self._location.delete(missing_ok=True)


class S3LockStore(LockStore):
    """S3 conditional writes through boto3 (`If-None-Match: *` to create, `If-Match: <ETag>` to renew, take
    over and delete). Endpoint and credentials come from the same AWS_* variables pyarrow reads."""

    conditional = True

    def __init__(self, key_uri: str):
        super().__init__(key_uri)
        parts = urlsplit(key_uri)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.bucket, self.key = parts.netloc, parts.path.lstrip("/")
        self.client = _s3_client(query.get("endpoint_override") or None, query.get("region") or None)

    def read(self) -> LockVersion | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self._errors() as exc:
            if _s3_code(exc) in ("NoSuchKey", "404"):
                return None
            raise _store_error(self.key_uri, "read", exc) from None
        body = response["Body"].read()
        now = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        server_now = email.utils.parsedate_to_datetime(now).timestamp() if now else time.time()
        return LockVersion(_parse(body), response["ETag"], server_now - response["LastModified"].timestamp())

    def _put(self, body: bytes, **condition) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
        except self._errors() as exc:
            if _s3_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return None
            raise _store_error(self.key_uri, "write", exc) from None

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def replace(self, body: bytes, version: str) -> str | None:
        return self._put(body, IfMatch=version)

    def delete(self, version: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
        except self._errors() as exc:
            logger.warning("could not remove the lock %s (%s)", self.key_uri, _s3_code(exc))

    @staticmethod
    def _errors():
        import botocore.exceptions

        return (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)


_s3_clients: dict[tuple, object] = {}
_s3_clients_lock = threading.Lock()


def _s3_client(endpoint: str | None, region: str | None):
    """One boto3 client per endpoint, region and AWS_* environment: making one costs ~0.5 s (its service
    model is loaded), and clients are thread-safe."""
    import boto3

    from sentiment_ray.io.storage import _store_settings

    key = (endpoint, region, _store_settings())
    with _s3_clients_lock:
        if key not in _s3_clients:
            _s3_clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region)
        return _s3_clients[key]


class GcsLockStore(LockStore):
    """GCS conditional writes through its JSON API (`ifGenerationMatch=0` to create, `=<generation>` to renew,
    take over and delete), authenticated by google-auth's default credentials (GOOGLE_* variables);
    STORAGE_EMULATOR_HOST points it at an emulator."""

    conditional = True

    def __init__(self, key_uri: str, session=None):
        super().__init__(key_uri)
        parts = urlsplit(key_uri)
        self.bucket, self.key = parts.netloc, parts.path.lstrip("/")
        self.api = os.environ.get("STORAGE_EMULATOR_HOST", "https://storage.googleapis.com").rstrip("/")
        if session is None:
            import google.auth
            from google.auth.transport.requests import AuthorizedSession

            credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
            session = AuthorizedSession(credentials)
        self.session = session

    def _object_url(self) -> str:
        from urllib.parse import quote

        return f"{self.api}/storage/v1/b/{self.bucket}/o/{quote(self.key, safe='')}"

    def read(self) -> LockVersion | None:
        meta = self.session.get(self._object_url())
        if meta.status_code == 404:
            return None
        self._check(meta, "read")
        info = meta.json()
        body = self.session.get(self._object_url(), params={"alt": "media", "ifGenerationMatch": info["generation"]})
        if body.status_code in (404, 412):
            return self.read()  # rewritten between the two requests: read the new one
        self._check(body, "read")
        now = email.utils.parsedate_to_datetime(meta.headers["Date"]).timestamp() if "Date" in meta.headers \
            else time.time()
        updated = _rfc3339(info["updated"])
        return LockVersion(_parse(body.content), str(info["generation"]), now - updated)

    def _upload(self, body: bytes, generation: str) -> str | None:
        response = self.session.post(f"{self.api}/upload/storage/v1/b/{self.bucket}/o", data=body,
                                     params={"uploadType": "media", "name": self.key,
                                             "ifGenerationMatch": generation},
                                     headers={"Content-Type": "application/json"})
        if response.status_code == 412:
            return None
        self._check(response, "write")
        return str(response.json()["generation"])

    def create(self, body: bytes) -> str | None:
        return self._upload(body, "0")

    def replace(self, body: bytes, version: str) -> str | None:
        return self._upload(body, version)

    def delete(self, version: str) -> None:
        response = self.session.delete(self._object_url(), params={"ifGenerationMatch": version})
        if response.status_code not in (200, 204, 404, 412):
            logger.warning("could not remove the lock %s (HTTP %s)", self.key_uri, response.status_code)

    def _check(self, response, action: str) -> None:
        if response.status_code >= 400:
            from sentiment_ray.io.storage import StorageError

            raise StorageError(f"{self.key_uri}: could not {action} the run lock (HTTP {response.status_code}: "
                               f"{response.text[:200]})")


def _store_for(canonical: str) -> LockStore:
    scheme = canonical.split("://", 1)[0]
    parent, name = canonical.rsplit("/", 1)
    key_uri = f"{parent}/.{name}.lock"
    try:
        if scheme == "s3":
            return S3LockStore(key_uri)
        if scheme == "gs":
            return GcsLockStore(key_uri)
    except ImportError as exc:
        logger.warning("%s: no client for conditional writes (%s); the run lock is checked by reading it back "
                       "instead", canonical, exc)
    return LockStore(key_uri)


class StoreRunLock:
    """The lock of an object-store output (see the module's doc): `with StoreRunLock(uri, store): ...`."""

    def __init__(self, final: str, store: LockStore, lease_seconds: float | None = None):
        self.final = final
        self.store = store
        self.lease_seconds = lease_seconds or LEASE_SECONDS
        self.token = uuid.uuid4().hex
        self._version: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self) -> bytes:
        return json.dumps(_holder_record(token=self.token, lease_seconds=self.lease_seconds,
                                         expires_at=time.time() + self.lease_seconds)).encode()

    def acquire(self) -> StoreRunLock:
        current = self.store.read()
        if current is not None and current.age_seconds <= self.lease_seconds:
            raise self._locked(current)
        if current is None:
            version = self.store.create(self._body())
        else:
            logger.warning("%s: taking over the lock of a run that stopped renewing it %.0f s ago (%s)", self.final,
                           current.age_seconds, _describe(current.record))
            version = self.store.replace(self._body(), current.version)
        if version is None:  # another run created or took it between our read and our write
            raise self._locked(self.store.read())
        # Read back after the other writers' requests have landed: an unconditional store's last writer wins,
        # and so does a store that ignores the condition or checks it non-atomically (moto's server does).
        time.sleep(SETTLE_SECONDS if not self.store.conditional else CONDITIONAL_SETTLE_SECONDS)
        found = self.store.read()
        if found is None or found.record.get("token") != self.token:
            raise self._locked(found)
        self._version = found.version if not self.store.conditional else version
        self._thread = threading.Thread(target=self._heartbeat, name="sentiment-ray-run-lock", daemon=True)
        self._thread.start()
        return self

    def _locked(self, current: LockVersion | None) -> OutputLockedError:
        holder = _describe(current.record) if current is not None else "its process details are unknown"
        return OutputLockedError(
            f"another run is writing into {self.final} ({holder}); wait for it to finish, or stop it and rerun "
            f"with --resume (a crashed run's lock expires {self.lease_seconds:.0f} s after its last renewal)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            with self._mutex:
                if self._lost:
                    return
                try:
                    if not self.store.conditional:  # never write over another run's lock: look first
                        found = self.store.read()
                        if found is None or found.record.get("token") != self.token:
                            self._lost = _describe(found.record) if found else "nobody holds it now"
                            return
                    version = self.store.replace(self._body(), self._version)
                except Exception as exc:  # a network blip: try again at the next beat, within the lease
                    logger.warning("could not renew the run lock of %s (%s)", self.final, exc)
                    continue
                if version is None:
                    self._lost = _describe((self.store.read() or LockVersion({}, "", 0)).record)
                    logger.error("the run lock of %s was taken over by another run (%s) after this run did not "
                                 "renew it in time; this run will not commit", self.final, self._lost)
                    return
                if not self.store.conditional:
                    found = self.store.read()
                    version = found.version if found else version
                self._version = version

    def verify(self) -> None:
        """Refuse to commit after the lock was lost (this run stalled past its lease and another took over)."""
        with self._mutex:
            found = None if self._lost else self.store.read()
            if self._lost or found is None or found.record.get("token") != self.token:
                holder = self._lost or (_describe(found.record) if found else "nobody holds it now")
                raise OutputLockedError(f"this run lost the lock of {self.final} to another run ({holder}) and "
                                        "stopped before its commit; rerun with --resume once the other run ended")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._version is not None and not self._lost:
            self.store.delete(self._version)
        self._version = None

    def __enter__(self) -> StoreRunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data or b"{}")
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def _rfc3339(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _s3_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code") or type(exc).__name__)


def _store_error(uri: str, action: str, exc: Exception) -> Exception:
    from sentiment_ray.io.storage import ENVIRONMENT_HINT

    code = _s3_code(exc)
    if code in ("AccessDenied", "403", "NoSuchBucket"):
        return OutputNotWritableError(f"output {uri.rsplit('/', 1)[0]}: cannot {action} its run lock {uri} ({code}); "
                                      "choose a writable location")
    from sentiment_ray.io.storage import StorageError

    return StorageError(f"{uri}: could not {action} the run lock ({code}); {ENVIRONMENT_HINT}")
