"""The command line never destroys what the tool did not write: each refusal exits 2 with one line naming the
path, before Ray starts, and leaves every file of the user's as it was (sha256 before and after)."""

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.cli import main
from sentiment_ray.scoring import MANIFEST_FILE
from tests.conftest import REPO_ROOT, write_reviews

SCORE_CONFIG = str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml")
FINETUNE_CONFIG = str(REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml")

pytestmark = pytest.mark.usefixtures("ray_must_not_start")


def checksums(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) → sha256: anything added, removed or changed shows."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv: list) -> str:
    """Run the CLI, expecting exit 2 and one line on stderr; returns that line."""
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sentiment-ray {argv[0]}: error: ")
    return lines[0]


@pytest.fixture
def user(tmp_path) -> Path:
    """A user's folder: reviews, a thesis, and a sub-folder of CSVs."""
    folder = tmp_path / "user"
    (folder / "csv").mkdir(parents=True)
    write_reviews(folder / "reviews.parquet", ["a fine film", "dreadful"], [1, 0], ids=["a", "b"])
    (folder / "thesis.pdf").write_bytes(b"%PDF years of work")
    (folder / "csv" / "table.csv").write_text("x,y\n1,2\n")
    return folder


def _score(random_adapter, *argv):
    return ["score", "--config", SCORE_CONFIG, "--adapter", random_adapter, *argv]


def _finetune(tiny_model_dir, train, *argv):
    return ["finetune", "--config", FINETUNE_CONFIG, *argv, f"model.name_or_path={tiny_model_dir}",
            f"data.train={train}"]


# --- the reporter's four cases -----------------------------------------------------------------------------


def test_score_into_its_own_input_file(user, random_adapter, capsys):
    reviews = user / "reviews.parquet"
    before = checksums(user)
    line = refused(capsys, _score(random_adapter, "--input", reviews, "--output", reviews, "--overwrite"))
    assert line.endswith(f"error: output {reviews} is the score input {reviews}; choose an output outside the inputs")
    assert checksums(user) == before and reviews.is_file()


def test_score_into_its_own_input_folder(user, random_adapter, capsys):
    before = checksums(user)
    line = refused(capsys, _score(random_adapter, "--input", user, "--output", user, "--overwrite"))
    assert line.endswith(f"error: output {user} is the score input {user}; choose an output outside the inputs")
    assert checksums(user) == before


def test_score_over_a_folder_of_unrelated_files(user, random_adapter, tmp_path, capsys):
    reviews = write_reviews(tmp_path / "in.parquet", ["good"], ids=["x"])
    before, input_before = checksums(user), checksums(tmp_path)
    for flag in ("--overwrite", "--resume"):
        line = refused(capsys, _score(random_adapter, "--input", reviews, "--output", user, flag))
        assert f"error: output {user} holds 3 entries not written by sentiment-ray, e.g. csv/, " in line
    assert checksums(user) == before and checksums(tmp_path) == input_before


def test_finetune_over_a_folder_of_notes(user, tiny_model_dir, synthetic_train_file, capsys):
    notes = user / "notes"
    notes.mkdir()
    (notes / "ideas.md").write_text("the plan")
    before = checksums(user)
    line = refused(capsys, _finetune(tiny_model_dir, synthetic_train_file, "--output-dir", notes, "--overwrite"))
    assert line.endswith(f"error: output {notes} holds 1 entry not written by sentiment-ray, e.g. ideas.md; choose "
                         "another path (--overwrite replaces only a folder holding sentiment_ray.json or an empty "
                         "folder)")
    assert checksums(user) == before


# --- inputs, home, roots: refused whatever the flags ----------------------------------------------------------


def test_score_over_an_earlier_output_it_reads_from(tmp_path, random_adapter, capsys):
    """An earlier score output passes the ownership rule (it holds the manifest), but it is this run's input."""
    scored = tmp_path / "scored"
    scored.mkdir()
    write_reviews(scored / "part-00000.parquet", ["good", "bad"], ids=["a", "b"])
    (scored / MANIFEST_FILE).write_text("{}")
    before = checksums(tmp_path)
    line = refused(capsys, _score(random_adapter, "--input", scored, "--output", scored, "--overwrite"))
    assert line.endswith(f"error: output {scored} is the score input {scored}; choose an output outside the inputs")
    line = refused(capsys, _score(random_adapter, "--input", scored, "--output", scored / "again"))
    assert line.endswith(f"error: output {scored / 'again'} lies inside the score input {scored}; choose an output "
                         "outside the inputs")
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("command", ["score", "finetune", "evaluate"])
def test_home_and_root_are_never_outputs(command, user, tmp_path, random_adapter, tiny_model_dir, capsys,
                                         monkeypatch):
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".config" / "settings").write_text("mine")
    (home / MANIFEST_FILE).write_text("{}")  # not even a home that happens to hold a marker file
    (home / "sentiment_ray.json").write_text("{}")
    (home / "metrics.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    reviews = user / "reviews.parquet"
    before, home_before = checksums(user), checksums(home)
    # `--output ~` reaches the CLI as the home path (the shell expands it); "~" and "~/" are expanded by the tool
    # (a quoted "~" must not turn into YAML's null on the way through the config overrides)
    for output, message in ((home, f"output {home} is your home directory; choose a folder inside it"),
                            ("~", f"output {home} is your home directory; choose a folder inside it"),
                            ("~/", f"output {home} is your home directory; choose a folder inside it"),
                            ("/", "output / is a filesystem root; choose a folder for this output")):
        argv = {"score": _score(random_adapter, "--input", reviews, "--output", output, "--overwrite"),
                "finetune": _finetune(tiny_model_dir, reviews, "--output-dir", output, "--overwrite"),
                "evaluate": ["evaluate", "--scored", user, "--labels", reviews, "--output", output, "--overwrite"],
                }[command]
        assert refused(capsys, argv).endswith(f"error: {message}")
    assert checksums(user) == before and checksums(home) == home_before
    assert not Path("/.lock").exists() and not list(Path("/").glob(".*.partial"))


def test_an_unwritable_location_is_refused_before_the_work(user, random_adapter, tiny_model_dir, capsys):
    reviews = user / "reviews.parquet"
    before = checksums(user)
    for argv in (_score(random_adapter, "--input", reviews, "--output", "/proc/sr-scored"),
                 _finetune(tiny_model_dir, reviews, "--output-dir", "/proc/sr-adapter"),
                 ["evaluate", "--scored", user, "--labels", reviews, "--output", "/proc/sr-eval"]):
        line = refused(capsys, argv)
        assert ": cannot write in /proc (" in line and line.endswith("; choose a writable location")
    assert checksums(user) == before


# --- evaluate ------------------------------------------------------------------------------------------------


@pytest.fixture
def scored_and_labels(tmp_path):
    scored = tmp_path / "scored"
    scored.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "score": [0.9, 0.2], "status": ["ok", "ok"]}),
                   scored / "part-00000.parquet")
    (scored / MANIFEST_FILE).write_text("{}")
    labels = write_reviews(tmp_path / "labels.parquet", ["t", "u"], [1, 0], ids=["a", "b"])
    return scored, labels


def test_evaluate_refusals(scored_and_labels, tmp_path, capsys):
    scored, labels = scored_and_labels
    before = checksums(tmp_path)
    cases = [
        (["--output", labels], f"output {labels} is the --labels path {labels}; choose an output outside the inputs"),
        (["--output", scored / "eval"], f"output {scored / 'eval'} lies inside the --scored path {scored}; choose an "
                                        "output outside the inputs"),
        (["--output", tmp_path / "eval", "--threshold", "7"], "threshold must be in [0, 1] (a score >= it is "
                                                              "positive), got 7.0"),
        (["--output", tmp_path / "eval", "--label-column", "truth"], f"{labels}: no label column 'truth' (columns: "
                                                                     "['id', 'text', 'label'])"),
    ]
    for extra, message in cases:
        line = refused(capsys, ["evaluate", "--scored", scored, "--labels", labels, *extra, "--overwrite"])
        assert line.endswith(f"error: {message}")
    # scoring a labeled file first (--input): refused before the scoring starts
    line = refused(capsys, ["evaluate", "--input", labels, "--output", tmp_path, "--config", SCORE_CONFIG,
                            "--overwrite"])
    assert line.endswith(f"error: output {tmp_path} contains the --input path {labels}; choose an output outside "
                         "the inputs")
    line = refused(capsys, ["evaluate", "--input", labels, "--output", tmp_path / "eval", "--config", SCORE_CONFIG,
                            "--threshold", "-1"])
    assert line.endswith("error: threshold must be in [0, 1] (a score >= it is positive), got -1.0")
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("case", ["ids_do_not_match", "duplicate_ids", "null_ids", "nothing_scored", "unreadable"])
def test_evaluate_data_errors_are_one_line(scored_and_labels, tmp_path, capsys, case):
    scored, labels = scored_and_labels
    part = scored / "part-00000.parquet"
    if case == "ids_do_not_match":
        write_reviews(labels, ["t", "u"], [1, 0], ids=["x", "y"])
        message = f"2 scored 'id' values have no label in {labels}, e.g. ['a', 'b']"
    elif case == "duplicate_ids":
        write_reviews(labels, ["t", "u", "v"], [1, 0, 0], ids=["a", "b", "b"])
        message = f"labels {labels}: 1 duplicate 'id' values, e.g. ['b']"
    elif case == "null_ids":
        write_reviews(labels, ["t", "u"], [1, 0], ids=["a", None])
        message = f"{labels}: column 'id' is null in 1 row(s), e.g. rows [1]; every label needs an id"
    elif case == "nothing_scored":
        pq.write_table(pa.table({"id": ["a", "b"], "score": pa.array([None, None], pa.float64()),
                                 "status": ["empty_text", "error"]}), part)
        message = (f"scored output {scored}: no scored rows to evaluate (2 rows, statuses "
                   "{'empty_text': 1, 'error': 1})")
    else:
        labels.write_bytes(b"PAR1 this is no Parquet file")
        message = f"{labels}: not a readable Parquet file ("
    out = tmp_path / "eval"
    line = refused(capsys, ["evaluate", "--scored", scored, "--labels", labels, "--output", out])
    assert message in line
    assert not out.exists() or list(out.iterdir()) == []


# --- finetune's data ----------------------------------------------------------------------------------------


def test_finetune_data_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    bad_bytes = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": pa.array([b"good", b"bad \xff"], pa.binary()).view(pa.string()),
                             "label": [1, 0]}), bad_bytes)
    empty = write_reviews(tmp_path / "empty.parquet", pa.array([], pa.string()), pa.array([], pa.int64()), ids=[])
    before = checksums(tmp_path)
    line = refused(capsys, _finetune(tiny_model_dir, bad_bytes, "--output-dir", tmp_path / "adapter"))
    assert line.endswith(f"error: {bad_bytes}: column 'text' row 1: invalid UTF-8 byte 0xff at byte 4; "
                         "fix or drop such rows first")
    line = refused(capsys, _finetune(tiny_model_dir, empty, "--output-dir", tmp_path / "adapter"))
    assert line.endswith(f"error: {empty}: no training rows (its 1 Parquet file(s) hold 0 rows); finetuning needs at "
                         "least one labeled review")
    assert checksums(tmp_path) == before
