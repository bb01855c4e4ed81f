import pytest

from sentiment_ray.outputs import (
    OutputExistsError,
    open_resumable_output,
    write_atomically,
)

MARKER = "_done.json"


def test_fresh_output_gets_a_hidden_work_folder(tmp_path):
    output = open_resumable_output(tmp_path / "out", overwrite=False, resume=False, finished_marker=MARKER)
    assert output.work == tmp_path / ".out.partial" and not output.finished


def test_unfinished_run_is_refused_without_resume(tmp_path):
    (tmp_path / ".out.partial").mkdir()
    with pytest.raises(OutputExistsError, match="pass --resume to continue it or --overwrite"):
        open_resumable_output(tmp_path / "out", overwrite=False, resume=False, finished_marker=MARKER)
    assert open_resumable_output(tmp_path / "out", overwrite=False, resume=True, finished_marker=MARKER).work.exists()
    open_resumable_output(tmp_path / "out", overwrite=True, resume=False, finished_marker=MARKER)
    assert not (tmp_path / ".out.partial").exists()  # --overwrite starts over


def test_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.parquet").write_text("x")
    with pytest.raises(OutputExistsError, match="--resume .* or --overwrite"):
        open_resumable_output(out, overwrite=False, resume=False, finished_marker=MARKER)
    with pytest.raises(OutputExistsError, match="not written by this tool"):
        open_resumable_output(out, overwrite=False, resume=True, finished_marker=MARKER)
    (out / MARKER).write_text("{}")
    assert open_resumable_output(out, overwrite=False, resume=True, finished_marker=MARKER).finished
    with pytest.raises(OutputExistsError, match="not both"):
        open_resumable_output(out, overwrite=True, resume=True, finished_marker=MARKER)
    with pytest.raises(OutputExistsError, match="object-store"):
        open_resumable_output("s3://bucket/out", overwrite=False, resume=False, finished_marker=MARKER)


def test_write_atomically_leaves_no_partial_file(tmp_path):
    target = tmp_path / "unit.parquet"

    def dies_half_way(path):
        path.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomically(target, dies_half_way)
    assert list(tmp_path.iterdir()) == []
    write_atomically(target, lambda p: p.write_text("whole"))
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]
