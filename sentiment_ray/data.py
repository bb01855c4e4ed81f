"""Finding, checking and loading review Parquet: every error names the file, the column and the row."""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sentiment_ray.labels import LabelError, normalize_labels


class InputError(ValueError):
    """Input data that cannot be used as it is; the message names the file, column or row."""


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_parquet_files(pattern: str) -> list[str]:
    """A Parquet file, a folder of them, or a glob → sorted absolute paths; a URI (file, folder) → sorted URIs."""
    if is_uri(pattern):
        return _resolve_uri(pattern)
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        files = sorted(str(p) for p in Path(expanded).rglob("*.parquet") if p.is_file())
    else:
        files = sorted(glob.glob(expanded, recursive=True))
    files = [os.path.abspath(f) for f in files if os.path.isfile(f)]
    if not files:
        raise InputError(f"no Parquet files match {pattern!r}")
    return files


def _resolve_uri(uri: str) -> list[str]:
    filesystem, root = pafs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.Directory:
        found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
        if files:
            return [f"{scheme}://{f}" for f in files]
    raise InputError(f"no Parquet files match {uri!r}")


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        if is_uri(path):
            filesystem, inner = pafs.FileSystem.from_uri(path)
            return pq.ParquetFile(filesystem.open_input_file(inner))
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad footer, a short file, a directory ...
        raise InputError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None


def check_columns(path: str, schema: pa.Schema, columns: dict[str, str], strings_only: bool = True) -> None:
    """`columns` maps a column name to the role it plays ("text", "id", ...), for the error message.
    `strings_only=False` lets a non-string text column through (scoring marks its rows instead of failing)."""
    for name, role in columns.items():
        if name not in schema.names:
            raise InputError(f"{path}: no {role} column {name!r} (columns: {schema.names})")
    for name, role in columns.items():
        if role == "text" and strings_only:
            field_type = schema.field(name).type
            if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
                raise InputError(f"{path}: {role} column {name!r} must hold strings, found {field_type}")


def count_rows(files: list[str]) -> int:
    return sum(open_parquet(f).metadata.num_rows for f in files)


def fingerprint(texts: list[str], labels: list[int]) -> str:
    """A content hash of the training rows in order: same data, same fingerprint, wherever it came from."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels):
        digest.update(str(label).encode())
        digest.update(b"\x1f")
        digest.update(text.encode("utf-8"))
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def _validated_rows(table: pa.Table, source: str, text_column: str, label_column: str) -> tuple[list[str], list[int]]:
    texts = table.column(text_column).to_pylist()
    for row, text in enumerate(texts):
        if text is None or not str(text).strip():
            raise InputError(
                f"{source}: column {text_column!r} row {row} is {'null' if text is None else 'empty'}; "
                "training needs text in every row (drop or fix such rows first)"
            )
    try:
        labels = normalize_labels(table.column(label_column).to_pylist(), where=f"{source}: column {label_column!r}")
    except LabelError as exc:
        raise InputError(str(exc)) from None
    return texts, labels


def load_labeled_parquet(pattern: str, text_column: str, label_column: str) -> tuple[list[str], list[int], list[str]]:
    """Texts and 0/1 labels from local Parquet, checked file by file."""
    texts, labels = [], []
    files = resolve_parquet_files(pattern)
    for path in files:
        parquet = open_parquet(path)
        check_columns(path, parquet.schema_arrow, {text_column: "text", label_column: "label"})
        try:
            table = parquet.read(columns=[text_column, label_column])
        except Exception as exc:
            raise InputError(f"{path}: could not read ({type(exc).__name__}: {exc})") from None
        file_texts, file_labels = _validated_rows(table, path, text_column, label_column)
        texts += file_texts
        labels += file_labels
    return texts, labels, files


def load_labeled_hf(name: str, split: str, text_column: str, label_column: str) -> tuple[list[str], list[int]]:
    """Texts and labels from a Hugging Face dataset (`hf:imdb`): the path users with hub access take."""
    from datasets import load_dataset

    dataset = load_dataset(name, split=split)
    source = f"hf:{name}[{split}]"
    check_columns(source, dataset.data.schema, {text_column: "text", label_column: "label"})
    return _validated_rows(dataset.data.table, source, text_column, label_column)
