"""sentiment_ray.io.storage on a local folder and on a real S3 API (moto_server, reached through AWS_* variables),
and what is built on it: inputs, adapters, finetune and evaluate outputs at object-store URIs."""

import hashlib
import json
import pickle
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.io.errors import InputError
from sentiment_ray.io.inputs import open_parquet, resolve_parquet_files
from sentiment_ray.io.outputs import (
    UPLOAD_MARKER,
    OutputExistsError,
    OutputNotWritableError,
    check_output_location_free,
    refuse_overlap,
    upload_output,
)
from sentiment_ray.io.storage import (
    Location,
    OutputWriteError,
    StorageError,
    StoreWriteError,
    is_uri,
    local_copy_of_folder,
    location,
    refused_mid_run,
    upload_folder,
)
from sentiment_ray.model.errors import AdapterError
from sentiment_ray.model.metadata import (
    ADAPTER_WEIGHTS,
    METADATA_FILE,
    adapter_identity,
    adapter_weights_sha256,
    check_adapter_loadable,
    local_adapter,
    read_metadata,
)
from sentiment_ray.training.data import load_labeled_parquet
from tests.conftest import write_reviews

BUCKET = "sr-tests"


@pytest.fixture(scope="session")
def bucket(s3_server) -> str:
    return s3_server.create_bucket(BUCKET)


@pytest.fixture
def s3_folder(bucket) -> Location:
    """A fresh, empty prefix of the test bucket."""
    return location(f"{bucket}/{uuid.uuid4().hex[:10]}")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    """An empty folder: on the local disk, or a fresh prefix on the S3 server."""
    if request.param == "local":
        return location(tmp_path / "store")
    return request.getfixturevalue("s3_folder")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ locations


def test_local_paths_and_file_uris_are_local_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = location("sub/x.parquet")
    assert (relative.is_local, relative.path, relative.uri) == (True, f"{tmp_path}/sub/x.parquet",
                                                                f"{tmp_path}/sub/x.parquet")
    assert location(f"file://{tmp_path}/sub/") == location(tmp_path / "sub") == relative.parent
    assert location("~/data").path == str(Path.home() / "data")
    assert (relative.name, str(relative.parent), str(relative.join("a", "b/c"))) == \
           ("x.parquet", f"{tmp_path}/sub", f"{tmp_path}/sub/x.parquet/a/b/c")
    assert location("/").parent == location("/")
    with pytest.raises(ValueError, match=r"cannot join '\.\./up' to .*: a path below it must be relative"):
        relative.join("../up")
    assert [is_uri(s) for s in ("s3://b/k", "file:///x", "gs://b", "/abs/p", "rel/p", "C:x")] == \
           [True, True, True, False, False, False]


def test_s3_uris_share_one_filesystem_per_bucket(s3_server):
    a, b = location("s3://sr-one/a/b/"), location("s3://sr-one/c")
    assert (a.path, a.uri, a.name, a.parent.uri, a.parent.parent.uri) == \
           ("sr-one/a/b", "s3://sr-one/a/b", "b", "s3://sr-one/a", "s3://sr-one")
    assert a.parent.parent.parent.uri == "s3://sr-one"  # a bucket is its own parent, as a root is
    assert a.join("c.parquet").uri == "s3://sr-one/a/b/c.parquet" and not a.is_local
    assert a.filesystem is b.filesystem
    assert location("s3://sr-two/a").filesystem is not a.filesystem


def test_unknown_schemes_and_missing_buckets_are_one_clear_error(s3_server):
    with pytest.raises(StorageError, match=r"^foo://x/y: not a path or URI this tool can read or write \(.*\); use "
                                           r"a local path or a file://, s3:// or gs:// URI$"):
        location("foo://x/y")
    with pytest.raises(StorageError, match=r"^s3:///key: names no bucket; write s3://<bucket>/<path>$"):
        location("s3:///key")
    assert issubclass(StorageError, InputError)  # the CLI's one line and exit 2
    with pytest.raises(StorageError, match=r"^s3://sr-no-such-bucket/k: could not write \(.*NO_SUCH_BUCKET.*\); "
                                           r"endpoints and credentials come from the AWS_\* \(AWS_ENDPOINT_URL"):
        location("s3://sr-no-such-bucket/k").write_bytes(b"x")


# ------------------------------------------------------------------------------------------ on both stores


def test_write_read_list_and_delete(root):
    data = bytes(range(256)) * 10
    assert root.join("a/b.bin").write_bytes(data) == root.join("a/b.bin")
    root.join("top.txt").write_with(lambda stream: stream.write("héllo".encode()))
    root.join("a/.hidden").write_bytes(b"")
    table = pa.table({"id": ["x", "y"], "score": [0.25, 0.75]})
    root.join("a/deep/t.parquet").write_with(lambda stream: pq.write_table(table, stream))

    assert root.join("a/b.bin").read_bytes() == data and root.join("top.txt").read_text() == "héllo"
    shipped = pickle.loads(pickle.dumps(root.join("a/b.bin")))  # as Ray sends it to an actor
    assert shipped == root.join("a/b.bin") and shipped.read_bytes() == data
    assert pq.ParquetFile(root.join("a/deep/t.parquet").open_input()).read().equals(table)
    assert (root.is_dir(), root.join("a").is_dir(), root.join("a").is_file(), root.join("a/b.bin").is_file()) == \
           (True, True, False, True)
    assert not root.join("nothing").exists() and not root.join("a/b").exists()
    info = root.join("a/b.bin").info()
    assert info.size == 2560 and info.mtime_ns > 1_600_000_000 * 10**9
    assert root.join("a").info().size is None
    with pytest.raises(FileNotFoundError, match="nothing does not exist"):
        root.join("nothing").info()

    assert [f.relative_to(root) for f in root.list_files()] == ["a/.hidden", "a/b.bin", "a/deep/t.parquet", "top.txt"]
    assert [f.uri for f in root.list_files(recursive=False)] == [root.join("top.txt").uri]
    assert [c.name for c in root.children()] == ["a", "top.txt"]
    assert root.join("nothing").list_files() == [] and root.join("top.txt").list_files() == []

    root.join("a/b.bin").delete()
    assert not root.join("a/b.bin").exists()
    with pytest.raises(FileNotFoundError, match=r"a/b\.bin does not exist"):
        root.join("a/b.bin").delete()
    root.join("a/b.bin").delete(missing_ok=True)
    root.join("a").delete_dir()
    assert [f.relative_to(root) for f in root.list_files()] == ["top.txt"]
    with pytest.raises(FileNotFoundError):
        root.join("a").delete_dir()
    root.join("a").delete_dir(missing_ok=True)

    root.join("made/here").makedirs()  # a folder locally; nothing at all on an object store
    assert root.join("made/here").is_dir() == root.is_local


def test_a_failing_writer_leaves_nothing_and_the_old_file_as_it_was(root):
    def half_then_fail(stream):
        stream.write(b"half of a file")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        root.join("new.bin").write_with(half_then_fail)
    assert not root.join("new.bin").exists()
    root.join("old.bin").write_bytes(b"the old content")
    with pytest.raises(RuntimeError, match="writer failed"):
        root.join("old.bin").write_with(half_then_fail)
    assert root.join("old.bin").read_bytes() == b"the old content"
    # no temporary left behind under any name
    assert [f.name for f in root.list_files()] == ["old.bin"]


def test_a_store_that_refuses_an_object_is_an_error_naming_it_and_leaves_the_old_object(s3_server):
    """pyarrow's copy_files drops the error of a refused upload (a bucket policy denying PutObject left no object
    and no exception): the upload is checked, and the store's own error named. Before a run's work it is a
    StorageError (the user's location, exit 2); during a run, refused_mid_run makes it the environment's."""
    bucket = s3_server.create_bucket(f"sr-refusing-{uuid.uuid4().hex[:8]}")
    folder = location(f"{bucket}/out")
    folder.join("old.bin").write_bytes(b"the old content")
    s3_server.deny_writes(f"{bucket}/out/*")
    try:
        with pytest.raises(StoreWriteError) as refused:
            folder.join("new.bin").write_bytes(b"x" * 1000)
        assert refused.value.uri == f"{bucket}/out/new.bin" and "ACCESS_DENIED" in refused.value.reason
        assert isinstance(refused.value, StorageError) and "\n" not in str(refused.value)
        assert pickle.loads(pickle.dumps(refused.value)).reason == refused.value.reason  # crosses Ray intact
        mid_run = pytest.raises(OutputWriteError, match=rf"^could not write {bucket}/out/old\.bin: .*ACCESS_DENIED")
        with mid_run, refused_mid_run():
            folder.join("old.bin").write_bytes(b"new")
    finally:
        s3_server.allow_writes(bucket)
    assert [f.name for f in folder.list_files()] == ["old.bin"]
    assert folder.join("old.bin").read_bytes() == b"the old content"
    folder.join("new.bin").write_bytes(b"x" * 1000)  # writes work again once the store takes them
    assert folder.join("new.bin").info().size == 1000


def test_a_local_write_goes_through_a_hidden_temporary_in_the_same_folder(tmp_path):
    seen = []

    def write(stream):
        seen.extend(p.name for p in tmp_path.iterdir())
        stream.write(b"x")

    location(tmp_path / "f.bin").write_with(write)
    assert len(seen) == 1 and seen[0].startswith(".f.bin.tmp-")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ------------------------------------------------------------------------------------------ folders: copy and upload


def _folder(tmp_path) -> Path:
    folder = tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text('{"a": 1}')
    (folder / "sub" / "w.bin").write_bytes(bytes(range(200)))
    (folder / "z.txt").write_text("last")
    return folder


def test_upload_folder_writes_every_file_and_the_named_ones_last(tmp_path, s3_folder):
    source = _folder(tmp_path)
    written = upload_folder(source, s3_folder, last=("a.json",))
    assert [w.relative_to(s3_folder) for w in written] == ["sub/w.bin", "z.txt", "a.json"]
    assert {f.relative_to(s3_folder): f.read_bytes() for f in s3_folder.list_files()} == _tree(source)


def test_local_copy_of_a_remote_folder_is_made_once(tmp_path, s3_folder):
    source = _folder(tmp_path)
    upload_folder(source, s3_folder)
    cache = tmp_path / "cache"
    copy = local_copy_of_folder(s3_folder, cache, "key-1")
    assert copy == cache / "key-1" and _tree(copy) == _tree(source)
    assert [p.name for p in cache.iterdir()] == ["key-1"]  # no temporary left beside it
    mtime = (copy / "sub" / "w.bin").stat().st_mtime_ns
    s3_folder.delete_dir()  # a second call that downloaded anything would now fail
    assert local_copy_of_folder(s3_folder, cache, "key-1") == copy
    assert (copy / "sub" / "w.bin").stat().st_mtime_ns == mtime and _tree(copy) == _tree(source)
    # a local folder is used where it is
    assert local_copy_of_folder(location(source), cache, "key-2") == source and not (cache / "key-2").exists()


def test_local_copy_refused_by_its_check_leaves_no_cache_entry(tmp_path, s3_folder):
    upload_folder(_folder(tmp_path), s3_folder)
    cache = tmp_path / "cache"

    def refuse(folder: Path):
        assert (folder / "z.txt").read_text() == "last"  # checked after the download, before the rename
        raise ValueError("not the expected content")

    with pytest.raises(ValueError, match="not the expected content"):
        local_copy_of_folder(s3_folder, cache, "key", check=refuse)
    assert list(cache.iterdir()) == []


def test_local_copy_keeps_the_copy_of_a_process_that_finished_first(tmp_path, s3_folder):
    upload_folder(_folder(tmp_path), s3_folder)
    cache = tmp_path / "cache"

    def another_process_wins(folder: Path):
        (cache / "key").mkdir()
        (cache / "key" / "theirs.txt").write_text("first")

    assert local_copy_of_folder(s3_folder, cache, "key", check=another_process_wins) == cache / "key"
    assert _tree(cache / "key") == {"theirs.txt": b"first"} and [p.name for p in cache.iterdir()] == ["key"]
    with pytest.raises(FileNotFoundError, match=r"s3://.*/nothing holds no files to copy"):
        local_copy_of_folder(s3_folder.join("nothing"), cache, "other")


# ------------------------------------------------------------------------------------------ inputs


def test_parquet_inputs_on_s3_are_listed_like_local_folders(tmp_path, s3_folder):
    local = tmp_path / "reviews"
    (local / "2024").mkdir(parents=True)
    write_reviews(local / "a.parquet", ["good", "bad"], [1, 0])
    write_reviews(local / "2024" / "b.parquet", ["fine"], [1])
    for hidden in ("_scored/part.parquet", ".a.partial/u.parquet", "2024/_c.parquet", ".hidden.parquet"):
        (local / hidden).parent.mkdir(parents=True, exist_ok=True)
        write_reviews(local / hidden, ["not a review"], [1])
    (local / "notes.txt").write_text("not parquet")
    upload_folder(local, s3_folder)

    files = resolve_parquet_files(s3_folder.uri)
    assert files == [f"{s3_folder.uri}/2024/b.parquet", f"{s3_folder.uri}/a.parquet"]
    assert resolve_parquet_files(files[1]) == [files[1]]  # a single file, as named
    assert open_parquet(files[0]).metadata.num_rows == 1
    texts, labels, listed = load_labeled_parquet(s3_folder.uri, "text", "label")
    assert (texts, labels, listed) == (["fine", "good", "bad"], [1, 1, 0], files)
    with pytest.raises(InputError, match=rf"^no Parquet files match '{s3_folder.uri}/nothing'$"):
        resolve_parquet_files(f"{s3_folder.uri}/nothing")
    s3_folder.join("bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=rf"^{s3_folder.uri}/bad\.parquet: not a readable Parquet file"):
        open_parquet(f"{s3_folder.uri}/bad.parquet")


# ------------------------------------------------------------------------------------------ adapters


def test_an_adapter_on_s3_reads_and_identifies_as_its_local_original(random_adapter, s3_folder, tiny_model_dir):
    remote = s3_folder.join("random-adapter")
    upload_folder(random_adapter, remote)
    assert adapter_identity(remote.uri) == adapter_identity(random_adapter)
    assert adapter_identity(remote.uri).startswith("random-adapter@")
    assert adapter_weights_sha256(remote.uri) == _sha256(random_adapter / ADAPTER_WEIGHTS)
    assert read_metadata(remote.uri) == read_metadata(random_adapter)
    assert check_adapter_loadable(remote.uri).base_model == str(tiny_model_dir)

    copy = local_adapter(remote.uri)
    from sentiment_ray.model.embedded import cache_dir

    assert copy == cache_dir() / "adapters" / _sha256(random_adapter / ADAPTER_WEIGHTS)
    assert _tree(copy) == _tree(random_adapter)
    assert local_adapter(random_adapter) == random_adapter  # a local adapter is used where it is
    # with the hash known (computed once on the driver), a cached copy costs no read of the store at all
    key = copy.name
    remote.delete_dir()
    assert local_adapter(remote.uri, weights_sha256=key) == copy


def test_an_adapter_on_s3_is_checked_as_strictly_as_a_local_one(random_adapter, s3_folder):
    with pytest.raises(AdapterError, match=rf"^adapter folder {s3_folder.uri}/gone does not exist$"):
        read_metadata(f"{s3_folder.uri}/gone")
    remote = s3_folder.join("adapter")
    upload_folder(random_adapter, remote)
    remote.join(METADATA_FILE).delete()
    with pytest.raises(AdapterError, match=rf"^{remote.uri} is not a sentiment_ray adapter: it has no "
                                           rf"{METADATA_FILE}$"):
        read_metadata(remote.uri)
    upload_folder(random_adapter, remote)
    weights = remote.join(ADAPTER_WEIGHTS)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match=rf"^{weights.uri}: not readable safetensors \(.*\); the file is truncated "
                                           "or damaged"):
        check_adapter_loadable(remote.uri)
    weights.delete()
    with pytest.raises(AdapterError, match=rf"^{remote.uri} has no {ADAPTER_WEIGHTS} \(only safetensors"):
        local_adapter(remote.uri)


# ------------------------------------------------------------------------------------------ outputs


def test_object_store_outputs_follow_the_local_rules(tmp_path, s3_folder, bucket):
    out = s3_folder.join("out")
    assert check_output_location_free(out.uri, overwrite=False, marker="mark.json") == out
    assert [f.name for f in s3_folder.list_files()] == []  # the write check left nothing
    with pytest.raises(OutputExistsError, match=rf"^output {bucket} is a bucket root; choose a folder inside it$"):
        check_output_location_free(bucket, overwrite=True, marker="mark.json")
    out.join("notes.md").write_bytes(b"mine")
    out.join("data/x.bin").write_bytes(b"mine too")
    with pytest.raises(OutputExistsError, match=rf"^output {out.uri} holds 2 entries not written by sentiment-ray, "
                                                r"e\.g\. data/, notes\.md; choose another path \(--overwrite replaces "
                                                r"only a folder holding mark\.json or an empty folder\)$"):
        check_output_location_free(out.uri, overwrite=True, marker="mark.json")
    with pytest.raises(OutputExistsError, match=rf"^output {out.uri}/notes\.md is a file not written by"):
        check_output_location_free(f"{out.uri}/notes.md", overwrite=True, marker="mark.json")
    with pytest.raises(OutputNotWritableError, match=r"^output s3://sr-no-such-bucket/out: cannot write in "
                                                     r"s3://sr-no-such-bucket \(.*NO_SUCH_BUCKET"):
        check_output_location_free("s3://sr-no-such-bucket/out", overwrite=False, marker="mark.json")
    assert out.join("notes.md").read_bytes() == b"mine" and out.join("data/x.bin").read_bytes() == b"mine too"

    data = s3_folder.join("data")
    with pytest.raises(OutputExistsError, match=rf"^output {data.uri}/adapter lies inside the training data "
                                                rf"{data.uri}; choose an output outside the inputs$"):
        refuse_overlap(f"{data.uri}/adapter", [data.uri], "training data")
    with pytest.raises(OutputExistsError, match=rf"^output {s3_folder.uri} contains the training data {data.uri}/t"):
        refuse_overlap(s3_folder.uri, [f"{data.uri}/t.parquet"], "training data")
    refuse_overlap(f"{data.uri}/adapter", [str(tmp_path), "s3://sr-other/data", f"{data.uri}2"], "training data")
    with pytest.raises(OutputExistsError, match=r"^output s3://sr-other is a bucket root; choose a folder inside it$"):
        refuse_overlap("s3://sr-other/", [str(tmp_path)], "training data")


OLD_NAMES = ("mark.json", "weights.bin", "old-only.txt")  # what the command wrote in a release that listed nothing


def test_upload_output_replaces_only_its_own_output_and_marks_an_unfinished_upload(tmp_path, s3_folder):
    out = s3_folder.join("adapter")
    first = tmp_path / "first"
    first.mkdir()
    (first / "weights.bin").write_bytes(b"old weights")
    (first / "old-only.txt").write_text("gone after a replace")
    (first / "mark.json").write_text("{}")
    upload_output(first, out, overwrite=False, marker="mark.json")
    assert [f.name for f in out.list_files()] == ["mark.json", "old-only.txt", "weights.bin"]

    second = tmp_path / "second"
    second.mkdir()
    (second / "weights.bin").write_bytes(b"new weights")
    (second / "mark.json").write_text('{"new": true}')
    # a marker of an earlier release (no list): only the names the command writes are its own
    with pytest.raises(OutputExistsError, match=rf"^output {out.uri} holds 2 entries not written by sentiment-ray, "
                                                r"e\.g\. old-only\.txt, weights\.bin, beside"):
        upload_output(second, out, overwrite=True, marker="mark.json")
    with pytest.raises(OutputExistsError, match=rf"^output {out.uri} appeared while this run was writing; result "
                                                rf"kept in {second}$"):
        upload_output(second, out, overwrite=False, marker="mark.json", legacy=OLD_NAMES)
    with pytest.raises(OutputExistsError, match=rf"^output {out.uri} already exists; choose a new path or pass "
                                                "--overwrite to replace it$"):
        check_output_location_free(out.uri, overwrite=False, marker="mark.json", legacy=OLD_NAMES)
    upload_output(second, out, overwrite=True, marker="mark.json", legacy=OLD_NAMES)
    assert {f.name: f.read_bytes() for f in out.list_files()} == {"mark.json": b'{"new": true}',
                                                                  "weights.bin": b"new weights"}

    # a run killed while uploading leaves its files and the upload marker, but no marker of a finished output
    out.join("mark.json").delete()
    out.join(UPLOAD_MARKER).write_bytes(b"")
    with pytest.raises(OutputExistsError, match=rf"^output {out.uri} holds an unfinished upload of an earlier run; "
                                                "choose a new path or pass --overwrite to replace it$"):
        check_output_location_free(out.uri, overwrite=False, marker="mark.json", legacy=OLD_NAMES)
    assert check_output_location_free(out.uri, overwrite=True, marker="mark.json", legacy=OLD_NAMES) == out
    upload_output(second, out, overwrite=True, marker="mark.json", legacy=OLD_NAMES)
    assert [f.name for f in out.list_files()] == ["mark.json", "weights.bin"]
    # an upload killed now lists what it was replacing and writing: a rerun may delete those, and only those
    out.join("mark.json").delete()
    out.join(UPLOAD_MARKER).write_bytes(json.dumps({"files_written": ["mark.json", "weights.bin"]}).encode())
    out.join("user.txt").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match=r"holds 1 entry not written by sentiment-ray, e\.g\. user\.txt"):
        check_output_location_free(out.uri, overwrite=True, marker="mark.json")
    out.join("user.txt").delete()
    upload_output(second, out, overwrite=True, marker="mark.json")
    assert [f.name for f in out.list_files()] == ["mark.json", "weights.bin"]


def test_claim_run_records_the_identity_in_an_object_store(s3_folder):
    from sentiment_ray.training.checkpoints import RUN_IDENTITY_FILE, ResumeMismatchError, claim_run

    assert claim_run(s3_folder.uri, "run-a", {"data_fingerprint": "aa"}) is False
    identity_file = s3_folder.join("run-a", RUN_IDENTITY_FILE)
    assert json.loads(identity_file.read_text()) == {"data_fingerprint": "aa"}
    assert claim_run(s3_folder.uri, "run-a", {"data_fingerprint": "aa"}) is True
    with pytest.raises(ResumeMismatchError, match=rf"other data_fingerprint \(recorded in {identity_file.uri}\)"):
        claim_run(s3_folder.uri, "run-a", {"data_fingerprint": "bb"})


# ------------------------------------------------------------------------------------------ evaluate


def _scored_and_labels(tmp_path, s3_folder) -> tuple[str, str]:
    local = tmp_path / "scored"
    local.mkdir()
    ids = [f"r{i}" for i in range(6)]
    scores = [0.9, 0.8, 0.2, 0.6, 0.1, 0.3]
    table = pa.table({"id": ids, "score": scores, "status": ["ok"] * 6})
    pq.write_table(table.slice(0, 4), local / "part-0.parquet")
    pq.write_table(table.slice(4), local / "part-1.parquet")
    (local / "_sentiment_ray_manifest.json").write_text("{}")
    upload_folder(local, s3_folder.join("scored"))
    labels = pa.table({"id": list(reversed(ids)), "label": ["negative", "negative", "positive", "negative",
                                                            "positive", "positive"]})
    s3_folder.join("labels.parquet").write_with(lambda stream: pq.write_table(labels, stream))
    return s3_folder.join("scored").uri, s3_folder.join("labels.parquet").uri


def test_evaluate_reads_scored_output_and_labels_from_s3(tmp_path, s3_folder):
    from sentiment_ray.evaluation.job import METRICS_FILE, evaluate

    scored, labels = _scored_and_labels(tmp_path, s3_folder)
    metrics = evaluate(scored, labels, tmp_path / "eval")
    # truth r0..r5 = 1,1,0,1,0,0; predicted (>= 0.5) = 1,1,0,1,0,0
    assert (metrics["n"], metrics["n_positive"], metrics["accuracy"], metrics["roc_auc"]) == (6, 3, 1.0, 1.0)
    assert (metrics["scored_path"], metrics["labels_path"]) == (scored, labels)
    written = json.loads((tmp_path / "eval" / METRICS_FILE).read_text())
    assert written.pop("files_written") == sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert written == metrics


def test_evaluate_writes_its_output_to_s3(tmp_path, s3_folder):
    from sentiment_ray.evaluation.job import (
        CONFUSION_PLOT,
        HISTOGRAM_PLOT,
        METRICS_FILE,
        RELIABILITY_PLOT,
        ROC_PLOT,
        evaluate,
    )

    scored, labels = _scored_and_labels(tmp_path, s3_folder)
    out = s3_folder.join("eval")
    metrics = evaluate(scored, labels, out.uri)
    assert sorted(f.name for f in out.list_files()) == sorted(
        [CONFUSION_PLOT, METRICS_FILE, RELIABILITY_PLOT, ROC_PLOT, HISTOGRAM_PLOT])
    written = json.loads(out.join(METRICS_FILE).read_text())
    assert written.pop("files_written") == sorted(f.name for f in out.list_files())
    assert written == metrics and metrics["accuracy"] == 1.0
    assert out.join(CONFUSION_PLOT).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(OutputExistsError, match=rf"^output {out.uri} already exists; choose a new path or pass "
                                                "--overwrite"):
        evaluate(scored, labels, out.uri)
    assert evaluate(scored, labels, out.uri, threshold=0.85, overwrite=True)["accuracy"] == pytest.approx(4 / 6)
    assert json.loads(out.join(METRICS_FILE).read_text())["threshold"] == 0.85
    with pytest.raises(OutputExistsError, match=rf"^output {scored} is the --scored path {scored};"):
        evaluate(scored, labels, scored, overwrite=True)


# ------------------------------------------------------------------------------------------ finetune


@pytest.mark.timeout(600)
def test_finetune_writes_its_adapter_and_ray_train_storage_to_s3(ray_session, tiny_model_dir, synthetic_train_file,
                                                                 s3_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sentiment_ray.config import FinetuneConfig, load_config
    from sentiment_ray.training.checkpoints import RUN_IDENTITY_FILE
    from sentiment_ray.training.job import run_finetune
    from tests.conftest import REPO_ROOT

    train = s3_folder.join("train/train.parquet").upload_file(synthetic_train_file)
    out = s3_folder.join("adapters/tiny")

    def config(*extra):
        return load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
            f"model.name_or_path={tiny_model_dir}", f"data.train={train.parent.uri}", f"output_dir={out.uri}",
            "train.max_steps=3", f"ray.storage_path={s3_folder.uri}/ray", "ray.run_name=s3-run", *extra])

    result = run_finetune(config())
    assert result["adapter_dir"] == out.uri
    uploaded = {f.relative_to(out): f.read_bytes() for f in out.list_files()}
    reported = s3_folder.join("ray", "s3-run", "adapter")  # the checkpoint the worker reported to Ray Train
    assert uploaded == {f.relative_to(reported): f.read_bytes() for f in reported.list_files()}
    assert {"adapter_config.json", ADAPTER_WEIGHTS, METADATA_FILE} < set(uploaded) and UPLOAD_MARKER not in uploaded
    metadata = read_metadata(out.uri)
    assert metadata.metrics["steps"] == 3 and metadata.data["files"] == [train.uri]
    assert s3_folder.join("ray", "s3-run", RUN_IDENTITY_FILE).is_file()

    local = local_adapter(out.uri)  # what scoring loads
    assert adapter_identity(out.uri) == f"tiny@{_sha256(local / ADAPTER_WEIGHTS)[:12]}"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(local))
    assert model.peft_config["default"].r == 8

    # a second run into the same URI is refused before any work; notes of the user's are never replaced
    with pytest.raises(OutputExistsError, match=rf"^output {out.uri} already exists; choose a new path or pass "
                                                "--overwrite to replace it$"):
        run_finetune(config("ray.run_name=s3-run-2"))
    notes = s3_folder.join("notes")
    notes.join("ideas.md").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match=rf"^output {notes.uri} holds 1 entry not written by sentiment-ray"):
        run_finetune(config(f"output_dir={notes.uri}", "overwrite=true", "ray.run_name=s3-run-3"))
    assert notes.join("ideas.md").read_bytes() == b"mine"


def test_the_cli_evaluates_on_s3_and_reports_store_errors_in_one_line(tmp_path, s3_folder, capsys, monkeypatch):
    from sentiment_ray.cli import main

    scored, labels = _scored_and_labels(tmp_path, s3_folder)
    out = s3_folder.join("eval")
    assert main(["evaluate", "--scored", scored, "--labels", labels, "--output", out.uri]) == 0
    assert capsys.readouterr().out.endswith(f"metrics and plots written to {out.uri}\n")
    assert main(["evaluate", "--scored", "s3://sr-no-such-bucket/scored", "--labels", labels,
                 "--output", str(tmp_path / "eval")]) == 2
    assert capsys.readouterr().err == ("sentiment-ray evaluate: error: no Parquet files match "
                                       "'s3://sr-no-such-bucket/scored'\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the store cannot be reached
    assert main(["evaluate", "--scored", scored, "--labels", labels, "--output", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sentiment-ray evaluate: error: {scored}: could not look up (") and err.count("\n") == 1
    assert err.endswith("); endpoints and credentials come from the AWS_* (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                        "AWS_SECRET_ACCESS_KEY, AWS_REGION) or GOOGLE_* environment variables\n")
    assert not (tmp_path / "eval").exists()
