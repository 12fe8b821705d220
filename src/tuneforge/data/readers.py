"""Reading data files row by row: JSONL, JSON arrays, CSV and Parquet, all streamed; the text kinds also
gzip-compressed (`train.jsonl.gz`, as Hugging Face datasets reads them). A `.txt` or `.md` file is one
document: a single text row (`{"text": ...}`) for continued pre-training.

A reader yields `(line, row)` pairs, where `row` is the decoded value (a dict for well-formed data)
or a `Problem` that says why the line could not be read. Nothing here knows what a chat row looks
like; that is `formats.py`'s job. Memory stays bounded by one row (capped at `MAX_ROW_BYTES`) plus
one read buffer, whatever the file size.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from ..errors import unreadable_json
from ..lone_surrogates import lone_surrogate
from ..wording import to_utf8
from .schema import Problem

MAX_ROW_BYTES = 2 * 1024 * 1024
"""One row over this (about half a million tokens) is a broken file, not a training example."""

_CHUNK_BYTES = 1024 * 1024
_BOM = b"\xef\xbb\xbf"
# Byte-order marks of the UTF-16 and UTF-32 that Windows tools write ("Unicode" in Notepad, `>` in
# PowerShell 5); UTF-32's come first, as UTF-32-LE's begins with UTF-16-LE's.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_LONE_SURROGATE = re.compile("[\udc80-\udcff]")  # what undecodable bytes become under surrogateescape
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of half a UTF-16 pair

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (*JSON_LINES_SUFFIXES, ".json")
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
DOCUMENT_SUFFIXES = (".txt", ".md", ".markdown")


@dataclass
class Rows:
    """The rows of one file, streamed. `columns` is the header of a CSV or Parquet file."""

    path: str
    kind: str
    columns: list[str] | None
    items: Iterator[tuple[int, Any]]
    file: IO | None = None  # the open file a CSV's rows are read from

    def __iter__(self):
        return self.items

    def close(self) -> None:
        """Close the file, its rows read or not (rows never started leave a CSV's file open to the collector)."""
        getattr(self.items, "close", lambda: None)()
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What to give instead of a folder or a pattern, where several data files are read (a run, `data check`).
FILES_BY_NAME = "Give the data files by name, one by one (data.train takes a list of them)."


def one_file_by_name(command: str) -> str:
    """What to give instead of a folder or a pattern, where `command` ("eval scores") reads one file a call."""
    return f"Give one data file by name: {command} one file a call."


def open_rows(path: str | Path, *, header: bool = True, by_name: str = FILES_BY_NAME) -> Rows:
    """Open a data file of any supported kind; problems with the file come out as `Problem` rows. A CSV file
    without a `header` line (MMLU's) has its first line read as a row, its columns named by position, 0 on.
    `by_name`: what a path that names no file (a folder, a pattern) is told to give instead (`not_a_file`)."""
    path = str(path)
    if not _compressed(path):
        return _open_rows(path, header, by_name)
    try:
        rows = _open_rows(path, header, by_name)
    except _DAMAGED_GZIP as e:
        return _failed(path, "unreadable_file", _damaged_gzip(path, e, None))
    return replace(rows, items=_until_damaged(path, rows.items))


def _open_rows(path: str, header: bool, by_name: str) -> Rows:
    p = Path(path)
    if (missing := not_a_file(path, by_name)) is not None:
        return _failed(path, missing.code, missing.message)
    suffix = _suffix(path)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_rows(path)
    if _compressed(path) and not _is_gzip(path):
        return _failed(
            path,
            "unreadable_file",
            f"the name ends in .gz but the file is not gzip-compressed. Rename it to {p.stem}, or compress it with "
            f"`gzip {p.stem}`.",
        )
    if not _compressed(path) and _is_gzip(path):
        return _failed(
            path,
            "unreadable_file",
            f"the file is gzip-compressed, but its name does not end in .gz. Rename it to {p.name}.gz, which is "
            f"read decompressed (or decompress it: `gunzip -c {p.name} > plain-{p.name}`).",
        )
    encoding = _wide_encoding(path)
    if encoding:
        return _failed(
            path,
            "invalid_utf8",
            f"the file is {encoding} (it starts with a {encoding} byte-order mark), not UTF-8. Re-save it as UTF-8 "
            f"(for example `iconv -f {encoding.lower()} -t utf-8 {p.name} > utf8-{p.name}`, or in PowerShell "
            "`Out-File -Encoding utf8`).",
            line=1,
        )
    if suffix in CSV_SUFFIXES:
        return _csv_rows(path, header)
    if suffix in DOCUMENT_SUFFIXES:
        return Rows(path, "document", None, _document_items(path))
    first = _first_byte(path)
    if first is None:
        return _failed(path, "empty_file", "the file is empty. Put data rows in it, one JSON object per line.")
    # A .jsonl file may start with "[" as a row of its own; one whose first line is not a whole JSON
    # value is a pretty-printed JSON array under a JSON Lines name.
    if first == b"[" and (suffix not in JSON_LINES_SUFFIXES or not _first_line_is_json(path)):
        return Rows(path, "json", None, _json_array_items(path))
    if suffix in JSON_LINES_SUFFIXES and first == b"{" and (_first_line(path)[1] or b"").strip() == b"{":
        # A lone "{" opens an object written over several lines (`jq .`, `json.dumps(indent=...)`): read
        # line by line, each of its lines would be an error of its own.
        return _failed(
            path,
            "invalid_json",
            "the file holds pretty-printed JSON objects, each over several lines, but JSON Lines takes one "
            f"complete object per line. Write each on one line (for example `jq -c . {p.name} > lines-{p.name}`), "
            "or make the file a JSON array named .json.",
            line=_first_line(path)[0],
        )
    if suffix in JSON_SUFFIXES or first in (b"{", b"["):
        return Rows(path, "jsonl", None, _jsonl_items(path))
    return _failed(
        path,
        "unknown_file_type",
        f"cannot tell what kind of file this is from its name ({suffix or 'no extension'}) or its first byte. "
        "Use .jsonl (one JSON object per line), .json (a JSON array), .csv or .parquet, or .txt or .md for a "
        "document of raw text (one a file; convert a PDF or Word file to text first).",
    )


def extent(path: str | Path) -> int:
    """How far the `line` numbers of a file's rows run: its rows for Parquet, its lines for a text
    file; 0 for a file that cannot be read. A measure of progress through the file, found without parsing it."""
    path = str(path)
    try:
        if _suffix(path) in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        lines, last = 0, b"\n"
        with _open_binary(path) as f:
            while chunk := f.read(_CHUNK_BYTES):
                lines, last = lines + chunk.count(b"\n"), chunk[-1:]
        return lines + (last != b"\n")
    except (OSError, ValueError, EOFError):  # an unreadable file shows no progress: reading its rows says why
        return 0


def _compressed(path: str) -> bool:
    return path.lower().endswith(".gz")


def _suffix(path: str) -> str:
    """The suffix that says what kind of file this is: that of the name under a .gz ("train.jsonl.gz": .jsonl)."""
    name = Path(path).name
    return Path(name[:-3] if _compressed(name) else name).suffix.lower()


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


# What reading a gzip file raises where its data is cut short or corrupt.
_DAMAGED_GZIP = (EOFError, gzip.BadGzipFile, zlib.error)


def _until_damaged(path: str, items: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """A gzip file's rows, ending in a Problem where its data turns out damaged."""
    line = None
    try:
        for line, row in items:
            yield line, row
    except _DAMAGED_GZIP as e:
        yield None, Problem("unreadable_file", _damaged_gzip(path, e, line), file=path)
    finally:
        getattr(items, "close", lambda: None)()


def _damaged_gzip(path: str, cause: Exception, line: int | None) -> str:
    unread = f"the rest of the file, after its row at line {line}," if line is not None else "the file"
    return (
        f"the gzip data is damaged or cut short ({cause}); {unread} was not read. Compress it again "
        f"from the original, or download it again (`gzip -t {Path(path).name}` tests a file)."
    )


def _open_binary(path: str):
    """A text data file's bytes, decompressed if it is gzip-compressed."""
    return gzip.open(path, "rb") if _compressed(path) else open(path, "rb")


def not_a_file(path: str, by_name: str = FILES_BY_NAME) -> Problem | None:
    """The problem of a data file's path that names no file (nothing, a folder, a pattern); None for a file.
    `by_name`: what to give instead of a folder or a pattern."""
    p = Path(path)
    if p.is_file():
        return None
    # Patterns are not read for their files: a run's data is the files it names (data.train names a
    # folder's files for it: `config.folder_files`).
    if p.is_dir():
        what = (
            "is an empty folder."
            if not any(p.iterdir())
            else "is a folder, not a file; data.train alone reads a folder's files (a document each)."
        ) + f" {by_name}"
    elif any(c in p.name for c in "*?["):
        what = f"does not exist: a pattern is not expanded. {by_name}"
    else:
        what = "does not exist. Check the path."
    return Problem("file_not_found", f"{path} {what}", file=path)


def _failed(path: str, code: str, message: str, line: int | None = None) -> Rows:
    return Rows(path, "unknown", None, iter([(line, Problem(code, message, file=path, line=line))]))


def _wide_encoding(path: str) -> str | None:
    """The encoding of a text file that starts with a UTF-16 or UTF-32 byte-order mark; None for any other."""
    with _open_binary(path) as f:
        head = f.read(4)
    return next((name for bom, name in _WIDE_BOMS if head.startswith(bom)), None)


def _first_line(path: str) -> tuple[int, bytes | None]:
    """The number and text of the first line that is not blank; its text is None if it is over MAX_ROW_BYTES.
    The file has one: `_first_byte` found it."""
    with _open_binary(path) as f:
        return next((n, raw) for n, raw in enumerate(bounded_lines(f), start=1) if raw is None or raw.strip())


def _first_line_is_json(path: str) -> bool:
    """Whether the first line that is not blank holds a whole JSON value."""
    _, line = _first_line(path)
    if line is None:  # over MAX_ROW_BYTES
        return False
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    except (RecursionError, ValueError) as e:  # JSON too deep or with too long an integer, or not UTF-8
        return unreadable_json(e) is not None
    return True


def _first_byte(path: str) -> bytes | None:
    """The first byte that is not whitespace or a UTF-8 byte-order mark; None for an empty file."""
    with _open_binary(path) as f:
        head = f.read(_CHUNK_BYTES)
        while head:
            stripped = head.removeprefix(_BOM).lstrip()
            if stripped:
                return stripped[:1]
            head = f.read(_CHUNK_BYTES)
    return None


# --- JSON Lines --------------------------------------------------------------------------------


def _jsonl_items(path: str) -> Iterator[tuple[int, Any]]:
    seen_row = False
    with _open_binary(path) as f:
        for line_no, raw in enumerate(bounded_lines(f), start=1):
            seen_row = seen_row or raw is None or bool(raw.strip())
            if raw is None:
                yield line_no, _too_large(path, line_no)
                continue
            if not raw.strip():
                yield line_no, Problem("blank_line", "blank line skipped", file=path, line=line_no, severity="warning")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, _not_utf8(path, line_no, raw[e.start], e.start + 1)
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                # The line's own newline is part of `text`: an object cut short fails past it, on "line 2"
                # of the text, so its column is not the line's. Say where in the line it went wrong.
                length = len(text.rstrip("\r\n"))
                where = "at the end of the line (is it cut short?)" if e.pos >= length else f"at column {e.pos + 1}"
                yield (
                    line_no,
                    Problem(
                        "invalid_json",
                        f"not valid JSON: {_json_error(e)} {where}. Each line must hold one complete JSON object; "
                        "fix or delete this line (a pretty-printed file must be a JSON array instead).",
                        file=path,
                        line=line_no,
                    ),
                )
                continue
            except (RecursionError, ValueError) as e:  # well-formed JSON that Python's reader gives up on
                yield line_no, _beyond_reading(path, line_no, unreadable_json(e), "Fix or delete this line.")
                continue
            yield line_no, _without_lone_surrogates(path, line_no, text, value)
    if not seen_row:
        yield None, Problem("empty_file", "the file has no rows, only blank lines. Put data rows in it.", file=path)


def _json_error(e: json.JSONDecodeError) -> str:
    """What the JSON parser says went wrong; for a raw control character (json's "Invalid control character
    at"), which character it is and what to do; for a comma before a closing bracket, which exports and
    hand edits leave and Python's parser (before 3.13) reports as a missing key or value, that it is one."""
    if e.msg.startswith("Invalid control character"):
        return (
            f"a raw control character (0x{ord(e.doc[e.pos]):02x}), which JSON strings take only escaped (remove it, "
            "or escape it; a 0x00 is usually binary data or a UTF-16 file)"
        )
    closing = e.doc[e.pos : e.pos + 1]
    if e.msg.startswith("Illegal trailing comma") or (closing in ("}", "]") and e.doc[: e.pos].rstrip().endswith(",")):
        return "a trailing comma (a ',' before a closing '}' or ']', which JSON does not allow: remove it)"
    return e.msg


def bounded_lines(f, limit: int = MAX_ROW_BYTES) -> Iterator[bytes | None]:
    """Lines of a binary file, the first without a UTF-8 byte-order mark (editors on Windows start files with one);
    None stands for a line over `limit` bytes, which is skipped unread."""
    bom = _BOM
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line, a buffer at a time
                raw = f.readline(_CHUNK_BYTES)
            yield None
        else:
            yield raw.removeprefix(bom)
        bom = b""


def _document_items(path: str) -> Iterator[tuple[int, Any]]:
    """A text document's one row, `{"text": ...}`: the whole file as UTF-8, refused if it is binary."""
    with _open_binary(path) as f:
        data = f.read(MAX_ROW_BYTES + 1).removeprefix(_BOM)
    if len(data) > MAX_ROW_BYTES:
        yield 1, _too_large(path, 1)
        return
    if b"\0" in data:  # no text holds a NUL byte: a PDF, a Word file, an image renamed .txt
        yield (
            None,
            Problem(
                "binary_file",
                f"{Path(path).name} is a binary file, not text (it holds a NUL byte), so it cannot be trained on as "
                "a document. Convert it to UTF-8 text first (for a PDF, `pdftotext`), or leave it out of data.train.",
                file=path,
            ),
        )
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        yield (line := data[: e.start].count(b"\n") + 1), _not_utf8(path, line, data[e.start], e.start - line_start + 1)
        return
    if not text.strip():
        yield 1, Problem("empty_file", "the document is empty. Put its text in it, or leave it out.", file=path, line=1)
        return
    yield 1, {"text": text}


def _beyond_reading(path: str, line: int, what: str | None, what_to_do: str) -> Problem:
    """The problem of a row that is JSON but that Python's JSON reader gives up on (`what`, from
    `errors.unreadable_json`): nested deeper than its recursion goes, or an integer of more digits than it converts."""
    return Problem(
        "invalid_json",
        f"the JSON {what or 'cannot be read'}; no training row needs that. {what_to_do}",
        file=path,
        line=line,
    )


def _too_large(path: str, line: int | None) -> Problem:
    return Problem(
        "row_too_large",
        f"this row is over {MAX_ROW_BYTES // (1024 * 1024)} MiB, far beyond any training length; it is usually "
        "several rows run together or an embedded file. Split it or remove it.",
        file=path,
        line=line,
    )


def _without_lone_surrogates(path: str, line: int | None, text: str, value: Any) -> Any:
    """`value`, or a Problem if a JSON escape left half of a UTF-16 pair in it (`"\\ud83d"`, an emoji cut in
    two): valid JSON, but text that no tokenizer can encode."""
    if not _SURROGATE_ESCAPE.search(text):  # a pair decodes to one character: only a lone half is left
        return value
    found = lone_surrogate(value)
    if found is None:
        return value
    return Problem(
        "invalid_unicode",
        "the text holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its other half, usually an "
        "emoji or other character cut in two), which cannot be encoded as text. Fix or remove it.",
        file=path,
        line=line,
        field=_field(found.keys[:-1] if found.in_key else found.keys) or None,
    )


def _field(keys: tuple[str | int, ...]) -> str:
    """A row's field as data problems name it: `messages[1].content`."""
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" if i else key for i, key in enumerate(keys))


def _not_utf8(path: str, line: int | None, byte: int, column: int | None = None) -> Problem:
    at = f" at byte {column} of the line" if column else ""
    return Problem(
        "invalid_utf8",
        f"not valid UTF-8 (byte 0x{byte:02x}{at}). Re-save the file as UTF-8 (for example {to_utf8(Path(path).name)}).",
        file=path,
        line=line,
    )


# --- JSON arrays, streamed element by element ----------------------------------------------------


class _TextWindow:
    """A growing window of decoded text over a binary file, with line numbers for its positions."""

    def __init__(self, f):
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.first_line = 1  # line number of text[0]
        self.at_eof = False
        # Line numbers are asked for at increasing positions: count newlines from the last answer on.
        self._cursor, self._cursor_line = 0, 1

    def line_of(self, index: int) -> int:
        if index < self._cursor:
            return self.first_line + self.text.count("\n", 0, index)
        self._cursor_line += self.text.count("\n", self._cursor, index)
        self._cursor = index
        return self._cursor_line

    def drop_before(self, index: int) -> None:
        self.first_line = self.line_of(index)
        self.text = self.text[index:]
        self._cursor, self._cursor_line = 0, self.first_line

    def read_more(self, at_least: int = _CHUNK_BYTES) -> bool:
        """Append at least one chunk of text; False at the end of the file. Raises UnicodeDecodeError."""
        if self.at_eof:
            return False
        chunk = self.f.read(max(at_least, _CHUNK_BYTES))
        self.at_eof = not chunk
        try:
            self.text += self.decoder.decode(chunk, final=self.at_eof)
        except UnicodeDecodeError as e:
            e.line = self.line_of(len(self.text)) + chunk[: max(e.start, 0)].count(b"\n")
            raise
        return not self.at_eof

    def skip_whitespace(self, pos: int) -> int | None:
        """Index of the next non-whitespace character at or after pos; None at the end of the file."""
        while True:
            pos = _WHITESPACE.match(self.text, pos).end()
            if pos < len(self.text):
                return pos
            if not self.read_more():
                return None


def _json_array_items(path: str) -> Iterator[tuple[int, Any]]:
    try:
        with _open_binary(path) as f:
            yield from _json_array_elements(path, _TextWindow(f))
    except UnicodeDecodeError as e:
        yield e.line, _not_utf8(path, e.line, e.object[e.start])


def _json_array_elements(path: str, window: _TextWindow) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()

    def broken(pos: int, what: str) -> tuple[int, Problem]:
        line = window.line_of(pos)
        return line, Problem(
            "invalid_json",
            f"{what} The rest of the file was not read; fix the JSON array and run again.",
            file=path,
            line=line,
        )

    window.read_more()
    pos = window.skip_whitespace(1 if window.text.startswith("\ufeff") else 0)
    pos += 1  # the opening "[", which open_rows has seen
    count = 0
    while True:
        pos = window.skip_whitespace(pos)
        if pos is None:
            yield broken(len(window.text), "the array is not closed: a ']' is missing at the end of the file.")
            return
        if window.text[pos] == "]":
            break
        if count:
            if window.text[pos] != ",":
                yield broken(pos, f"expected ',' or ']' between array elements, found {window.text[pos]!r}.")
                return
            pos = window.skip_whitespace(pos + 1)
            if pos is None:
                yield broken(len(window.text), "the array ends after a ','.")
                return
        if pos > _CHUNK_BYTES:  # forget what has been parsed, now and then rather than per element
            window.drop_before(pos)
            pos = 0
        start_line = window.line_of(pos)
        while True:
            try:
                value, end = decoder.raw_decode(window.text, pos)
                # A number cut off at the end of the window would decode as a shorter number.
                if end < len(window.text) or not window.read_more():
                    break
            except json.JSONDecodeError as e:
                if len(window.text) - pos > MAX_ROW_BYTES:
                    yield start_line, _too_large(path, start_line)
                    return
                if not window.read_more(at_least=len(window.text) - pos):
                    yield broken(e.pos, f"not valid JSON: {_json_error(e)}.")
                    return
            except (RecursionError, ValueError) as e:
                if (what := unreadable_json(e)) is None:  # bytes that are not UTF-8: _json_array_items says so
                    raise
                # Well-formed JSON that Python's reader gives up on; where the element ends is not known.
                yield (
                    start_line,
                    _beyond_reading(
                        path, start_line, what, "The rest of the file was not read; fix or remove this element."
                    ),
                )
                return
        yield start_line, _without_lone_surrogates(path, start_line, window.text[pos:end], value)
        pos, count = end, count + 1
    if window.skip_whitespace(pos + 1) is not None:
        yield broken(pos + 1, "there is text after the closing ']'.")
    if not count:
        yield None, Problem("empty_file", "the JSON array is empty. Put data rows in it.", file=path)


# --- CSV -----------------------------------------------------------------------------------------


def _csv_rows(path: str, header_line: bool = True) -> Rows:
    # Undecodable bytes survive as lone surrogates, so each bad row is reported on its own line.
    f = (gzip.open if _compressed(path) else open)(
        path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline=""
    )
    reader = csv.reader(_csv_lines(f), delimiter=_delimiter(f))
    try:
        header = next(reader, None)
    except _LineTooLong:
        f.close()
        return _failed(path, "row_too_large", _too_large(path, 1).message, line=1)
    except csv.Error as e:
        f.close()
        return _failed(path, "invalid_csv", f"cannot read the CSV header: {e}.", line=1)
    if header is None:
        f.close()
        return _failed(path, "empty_file", "the file is empty. Put a header line and data rows in it.")
    columns = [name.strip() for name in header]
    if not header_line:  # the first line is a row: read again from it, each cell kept under its position
        columns = [str(i) for i in range(len(header))]
        f.seek(0)
        reader = csv.reader(_csv_lines(f), delimiter=reader.dialect.delimiter)
    return Rows(path, "csv", columns, _csv_items(path, f, reader, columns, header_line), f)


class _LineTooLong(Exception):
    """A CSV line over MAX_ROW_BYTES, met before all of it is read."""


def _csv_lines(f) -> Iterator[str]:
    """A CSV file's lines for csv.reader, which reads a line whole: one line of gigabytes would be held in
    memory, so a line is read MAX_ROW_BYTES characters at most, and one over MAX_ROW_BYTES bytes of UTF-8
    raises _LineTooLong. A character is at most 4 bytes, so only a line over a quarter of that is encoded to
    count them."""
    while line := f.readline(MAX_ROW_BYTES + 1):
        if len(line) > MAX_ROW_BYTES // 4 and len(line.encode("utf-8", "surrogateescape")) > MAX_ROW_BYTES:
            raise _LineTooLong
        yield line


_DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab"}


def _delimiter(f) -> str:
    """The delimiter of the header line: a comma, or the semicolon or tab that spreadsheets write in
    many locales."""
    header = f.readline(MAX_ROW_BYTES)
    f.seek(0)
    try:
        return csv.Sniffer().sniff(header, delimiters=",;\t").delimiter
    except csv.Error:  # a single column
        return ","


def _csv_items(path: str, f, reader, columns: list[str], header_line: bool) -> Iterator[tuple[int, Any]]:
    """The rows under `columns`; a row with another number of fields is compared with the header, or, in a file
    without one (`header_line` false), with the first line, whose fields the columns count."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_BYTES))
    seen_row = False
    if header_line:
        fields = f"the header has {len(columns)} ({', '.join(columns)})"
    else:
        fields = f"the first line has {len(columns)} (the file has no header)"
    with f:
        next_line = reader.line_num + 1
        while True:
            line = next_line
            try:
                cells = next(reader, None)
            except (csv.Error, _LineTooLong) as e:
                # "field larger than field limit" is csv's only sign of a field over MAX_ROW_BYTES.
                if isinstance(e, _LineTooLong) or "field larger than field limit" in str(e):
                    problem = _too_large(path, line)
                    problem = replace(problem, message=f"{problem.message} The rest of the file was not read.")
                else:
                    problem = Problem(
                        "invalid_csv", f"not valid CSV: {e}. The rest of the file was not read.", file=path, line=line
                    )
                yield line, problem
                return
            if cells is None:
                break
            next_line = reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                yield line, Problem("blank_line", "blank line skipped", file=path, line=line, severity="warning")
                continue
            seen_row = True
            bad = next((cell for cell in cells if _LONE_SURROGATE.search(cell)), None)
            if bad is not None:
                byte = ord(_LONE_SURROGATE.search(bad).group()) - 0xDC00
                yield line, _not_utf8(path, line, byte)
                continue
            if len(cells) != len(columns):
                yield (
                    line,
                    Problem(
                        "csv_field_count",
                        f"this row has {len(cells)} fields but {fields}. "
                        f"Quote any field that contains a {_DELIMITER_NAMES[reader.dialect.delimiter]} or a line "
                        'break ("...").',
                        file=path,
                        line=line,
                    ),
                )
                continue
            yield line, dict(zip(columns, cells))
    if not seen_row:
        yield None, Problem("empty_file", "the file has a header but no rows.", file=path)


# --- Parquet -------------------------------------------------------------------------------------


def _parquet_rows(path: str) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        return _failed(path, "unreadable_file", f"not a readable Parquet file ({e}).")
    return Rows(path, "parquet", list(parquet.schema_arrow.names), _parquet_items(path, parquet))


def _parquet_items(path: str, parquet) -> Iterator[tuple[int, Any]]:
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record
    if not row:
        yield None, Problem("empty_file", "the Parquet file has no rows.", file=path)
