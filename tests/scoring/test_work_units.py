import pyarrow as pa
import pyarrow.parquet as pq

from sentiment_ray.scoring.work_units import (
    WorkUnit,
    derived_ids,
    file_keys,
    plan_units,
    read_unit,
)


def _file(path, rows, row_group_rows):
    pq.write_table(pa.table({"id": list(range(rows)), "text": [f"t{i}" for i in range(rows)]}), path,
                   row_group_size=row_group_rows)
    return str(path)


def test_units_follow_row_groups_and_cover_every_row_once(tmp_path):
    small = _file(tmp_path / "small.parquet", 250, 50)  # five row groups of 50: gathered two per unit of <= 100
    big = _file(tmp_path / "big.parquet", 1000, 1000)  # one row group of 1,000: cut into row ranges
    units = plan_units([small, big], 100)
    assert [(u.file_index, u.start, u.stop) for u in units if u.file == small] == [(0, 0, 100), (0, 100, 200),
                                                                                   (0, 200, 250)]
    assert [(u.start, u.stop) for u in units if u.file == big] == [(s, s + 100) for s in range(0, 1000, 100)]
    assert len({u.name for u in units}) == len(units)
    for path, rows in ((small, 250), (big, 1000)):
        ids = [i for u in units if u.file == path
               for i in read_unit(u, ["id", "text", "absent"]).column("id").to_pylist()]
        assert ids == list(range(rows))  # in order, none twice, none missing


def test_read_unit_decodes_only_its_rows(tmp_path):
    path = _file(tmp_path / "f.parquet", 300, 100)
    table = read_unit(WorkUnit(0, path, "f.parquet", 130, 170), ["text"])
    assert table.column_names == ["text"] and table.column("text").to_pylist() == [f"t{i}" for i in range(130, 170)]


def test_derived_ids_are_file_key_and_row_index(tmp_path):
    (tmp_path / "a").mkdir()
    files = [str(tmp_path / "a" / "x.parquet"), str(tmp_path / "y.parquet")]
    assert file_keys(files) == ["a/x.parquet", "y.parquet"]
    assert file_keys(files[:1]) == ["x.parquet"]
    unit = WorkUnit(0, files[0], "a/x.parquet", 5, 8)
    assert derived_ids(unit).to_pylist() == ["a/x.parquet:5", "a/x.parquet:6", "a/x.parquet:7"]


def test_a_column_asked_for_twice_is_read_once_and_bad_bytes_come_back_as_they_are(tmp_path):
    """The text column is also a kept column with `--keep-columns text`; its invalid UTF-8 cells are data too."""
    raw = [b"fine", b"bad \xff", None]
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": pa.array(raw, pa.binary()).view(pa.string())}), path)
    table = read_unit(WorkUnit(0, str(path), "f.parquet", 0, 3), ["id", "text", "text"])
    assert table.column_names == ["id", "text"] and table.schema.field("text").type == pa.string()
    assert table.column("text").cast(pa.binary()).to_pylist() == raw
