"""The error every bad input raises, how a message quotes what it names (one line, values cut short), and the
walk through the layers Ray wraps around an error."""

from __future__ import annotations


class InputError(ValueError):
    """Input data that cannot be used as it is; the message names the file, column or row."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (pyarrow's span several)."""
    return " ".join(str(exc).split())


QUOTED_CHARS = 100  # a value quoted in a message: a 100 KB id must not make a 500 KB error line


def quoted(value: object, limit: int = QUOTED_CHARS) -> str:
    """`repr(value)` cut to about `limit` characters, saying how long it was."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def quoted_list(values: list) -> str:
    """A list of values for a message, each cut as `quoted` cuts it."""
    return "[" + ", ".join(quoted(v) for v in values) + "]"


def causes(exc: BaseException):
    """`exc` and every exception under it (causes, contexts, Ray's `cause`), each once: Ray and Ray Data wrap what
    a task raised in layers of their own."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
