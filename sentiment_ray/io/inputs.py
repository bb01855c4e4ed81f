"""Finding, checking and loading review Parquet: every error names the file, the column and the row."""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sentiment_ray.io.errors import InputError, one_line, quoted


def is_uri(path: str) -> bool:
    from sentiment_ray.io import storage

    return storage.is_uri(path)


def resolve_parquet_files(pattern: str) -> list[str]:
    """A Parquet file, a folder of them, or a glob → sorted absolute paths; a URI (file, folder) → sorted URIs.

    A folder contributes its `*.parquet` files at any depth, except those under a name starting with `_` or `.`
    (the convention of pyarrow datasets): an earlier output's manifest and plan, this tool's hidden temporary
    files and staging folders are never read as reviews. A glob gives the `.parquet` files and the folders it matches,
    the same names skipped unless the pattern spells them out (`_*.parquet`, `.cache/*.parquet`); a plain path
    names its file whatever its suffix. A path that exists is read as itself whatever characters its name holds;
    only one that does not exist is a pattern (input_matches)."""
    if is_uri(pattern) and not is_pattern(pattern):
        return _resolve_uri(pattern)  # file:// inputs stay file:// URIs
    expanded = os.path.expanduser(_local_part(pattern))
    if os.path.isdir(expanded):
        files = _folder_parquet_files(expanded)
    elif is_pattern(pattern):
        files = []
        for match in input_matches(pattern):
            if not _spelled_out(expanded, match):
                continue
            if os.path.isdir(match):
                files += _folder_parquet_files(match)
            elif match.endswith(".parquet"):
                files.append(match)
    else:
        files = [expanded] if os.path.isfile(expanded) else []
    files = sorted({os.path.abspath(f) for f in files if os.path.isfile(f)})
    if not files:
        raise InputError(f"no Parquet files match {pattern!r}")
    return files


def _local_part(given: str) -> str:
    """A local path as given, or the path of a file:// URI."""
    if given.lower().startswith("file://"):
        from sentiment_ray.io.storage import location

        return location(given).path
    return given


def is_pattern(given: str) -> bool:
    """True for a local input to expand as a glob: it holds `*`, `?` or `[` and no file or folder has that name.
    Paths are read as they are: `reviews [2024].parquet` that exists is that file, not a pattern matching
    `reviews 2.parquet`."""
    if is_uri(given) and not given.lower().startswith("file://"):
        return False  # object-store inputs are files or folders, never patterns
    expanded = os.path.expanduser(_local_part(given))
    return glob.has_magic(expanded) and not os.path.lexists(expanded)


def input_matches(given: str) -> list[str]:
    """What one local input argument names before any folder in it is walked: the path itself when it exists
    (whatever characters its name holds), else the sorted matches of it as a glob pattern (`**` recursive).
    The reading (resolve_parquet_files) and the output checks (sentiment_ray.io.outputs) both use this, so they
    never disagree on what an input is."""
    expanded = os.path.expanduser(_local_part(given))
    if not is_pattern(given):
        return [expanded]
    return sorted(glob.glob(expanded, recursive=True))


def pattern_could_match(pattern: str, path: str) -> bool:
    """True when the input pattern `pattern` matches `path` (absolute), a folder holding it, or something below
    it: an output there would be read as input by the next run with the same arguments (a resume, a rerun)."""
    if not is_pattern(pattern):
        return False
    parts = Path(os.path.abspath(os.path.expanduser(_local_part(pattern)))).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    prefix = Path(*parts[:fixed]).resolve()  # symlinks followed as the output's path has them followed
    return _could_match(prefix.parts + parts[fixed:], Path(path).parts)


def _could_match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    if not pattern or not parts:
        # The pattern ends at the path or at a folder holding it (a matched folder is read whole), or the path
        # ends first and the rest of the pattern could match inside it.
        return True
    head = pattern[0]
    if head == "**":
        return _could_match(pattern[1:], parts) or _could_match(pattern, parts[1:])
    return fnmatch.fnmatchcase(parts[0], head) and _could_match(pattern[1:], parts[1:])


def _is_data_name(name: str) -> bool:
    return not name.startswith(("_", "."))


def _spelled_out(pattern: str, match: str) -> bool:
    """False when the wildcards of `pattern` reached a `_`/`.` name that the pattern does not ask for by its first
    character, as `*` does not ask for `_scored` (Python's glob already treats `.` names so)."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    asked = {part[0] for part in parts[fixed:] if part[:1] in ("_", ".")}
    return all(part[0] in asked for part in Path(match).parts[fixed:] if not _is_data_name(part))


def _folder_parquet_files(folder: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if _is_data_name(d)]
        files += [os.path.join(root, n) for n in names if n.endswith(".parquet") and _is_data_name(n)]
    return files


def _resolve_uri(uri: str) -> list[str]:
    from sentiment_ray.io.storage import location

    root = location(uri)
    if root.is_file():
        return [uri]
    scheme = uri.split("://", 1)[0]  # file:// inputs stay file:// URIs
    files = [f"{scheme}://{f.path}" for f in root.list_files() if f.name.endswith(".parquet")
             and all(_is_data_name(part) for part in f.relative_to(root).split("/"))]
    if files:
        return files
    raise InputError(f"no Parquet files match {uri!r}")


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        if is_uri(path):
            from sentiment_ray.io.storage import location

            return pq.ParquetFile(location(path).open_input())
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad footer, a short file, a directory ...
        raise InputError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {one_line(exc)})") from None


def join_key(value: object) -> str:
    """An id as it is joined and checked for duplicates: `1` and `"1"` are one id (files written by different
    tools often disagree on the type), so the duplicate check and the join can never disagree."""
    return value if isinstance(value, str) else str(value)


def duplicate_ids(ids: list, sources: list[str] | None = None) -> list[str]:
    """Each id seen more than once, compared by join_key, in the order found, described for a message: the value,
    or the two values and their files where they differ in type or file (`1 in a.parquet and '1' in b.parquet`)."""
    first: dict[str, int] = {}
    found: dict[str, str] = {}
    for row, value in enumerate(ids):
        key = join_key(value)
        if key not in first:
            first[key] = row
            continue
        if key in found:
            continue
        earlier = first[key]
        where = (sources[earlier], sources[row]) if sources else (None, None)
        if ids[earlier] == value and type(ids[earlier]) is type(value) and where[0] == where[1]:
            found[key] = quoted(value)
        else:
            found[key] = (f"{quoted(ids[earlier])}{f' in {where[0]}' if where[0] else ''} and "
                          f"{quoted(value)}{f' in {where[1]}' if where[1] else ''}")
    return list(found.values())


def read_checked(path: str, columns: dict[str, str], all_columns: bool = False, strings_only: bool = True) -> pa.Table:
    """The columns of one Parquet file that `columns` names (all of the file's with `all_columns`), after
    checking that they are there (see check_columns); every failure names the file."""
    parquet = open_parquet(path)
    check_columns(path, parquet.schema_arrow, columns, strings_only=strings_only)
    try:
        return parquet.read(columns=None if all_columns else list(columns))
    except Exception as exc:  # damaged pages: pyarrow raises OSError, ArrowInvalid, ...
        raise InputError(f"{path}: could not read ({type(exc).__name__}: {one_line(exc)})") from None


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


def utf8_problem(text: str) -> str | None:
    """Why `text` cannot be encoded as UTF-8, naming the invalid byte (for surrogate-escaped bytes) or the lone
    surrogate; None when it can. The tokenizer would raise on such text, for the whole batch."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        problem = f"lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
    try:  # surrogate-escaped bytes: name the original byte and its offset
        text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeEncodeError:
        pass
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 byte 0x{exc.object[exc.start]:02x} at byte {exc.start}"
    return problem


def unvalidated_type(arrow_type: pa.DataType) -> pa.DataType | None:
    """The binary type a string (or binary) column is read through, so that pyarrow never validates UTF-8."""
    if pa.types.is_dictionary(arrow_type):
        return unvalidated_type(arrow_type.value_type)
    if pa.types.is_string(arrow_type) or pa.types.is_binary(arrow_type):
        return pa.binary()
    if pa.types.is_large_string(arrow_type) or pa.types.is_large_binary(arrow_type):
        return pa.large_binary()
    if pa.types.is_string_view(arrow_type) or pa.types.is_binary_view(arrow_type):
        return pa.binary_view()
    return None


def text_values(column: pa.Array | pa.ChunkedArray) -> list:
    """A text column as Python values for `score_texts`, with one bad cell costing only its row: pyarrow's
    `to_pylist` raises on the first invalid UTF-8 value of a string column, so string and binary columns are
    read as bytes (a zero-copy cast, no validation) and decoded with `surrogateescape`; `score_texts` marks the
    rows that hold escaped bytes `invalid_utf8`. Other types come out as they are (`non_string_text`)."""
    binary = unvalidated_type(column.type)
    if binary is None:
        return column.to_pylist()
    return [None if v is None else v.decode("utf-8", "surrogateescape") for v in column.cast(binary).to_pylist()]


def column_values(table: pa.Table, name: str, source: str, first_row: int = 0) -> list:
    """A column as Python values; a string cell holding invalid UTF-8 is an InputError naming the file, column
    and row (pyarrow's own conversion fails on such a cell without saying which row it is)."""
    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column.to_pylist()
    values = text_values(column)
    for row, value in enumerate(values):
        if value is not None and (problem := utf8_problem(value)):
            raise InputError(f"{source}: column {name!r} row {first_row + row}: {problem}; fix or drop such rows first")
    return values


