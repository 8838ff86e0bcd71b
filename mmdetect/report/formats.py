"""Rows -> csv | tsv | json | jsonl | parquet | markdown. The only module that branches on a file format.

Every command writes here: ``write`` takes a ``ScanResult`` (the scan's numpy columns), a DataFrame (heads, chains,
``scan --verify``, a sweep's summary) or a list of dicts (``archs``); ``write_document`` writes a JSON document
(explain, sweep records). File formats carry every row they are given; provenance goes into the JSON document and
the Parquet schema metadata, never into CSV (which stays plain for ``pandas.read_csv``). JSON goes through the json
module; CSV and TSV through one writer (pyarrow's). Files are written to a temporary file beside the target and
renamed over it, so a failed run never leaves a partial file or clobbers an existing one.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

from mmdetect.errors import MMDetectError, OutputError
from mmdetect.results.rows import ScanResult

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

FILE_FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "markdown")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet", ".pq": "parquet", ".md": "markdown", ".markdown": "markdown",
              ".html": "html", ".htm": "html"}  # html: the report page (commands/page.py), not a row format
FLOAT_FORMAT = "%.8g"
COMPACT = (",", ":")  # the rows' JSON separators since the first version (pandas' to_json wrote them this way)


def infer_format(path: str | os.PathLike) -> str:
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        raise MMDetectError(f"cannot tell the format of {path} from its extension: add --format "
                            f"({', '.join(FILE_FORMATS)})")
    return fmt


# -- writing files safely: the single entry point (the IO layer may swap the bodies) --------------------------------

def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any scanning, if ``path`` cannot be written (see ``io.output``); and again as soon as the
    model opens if ``path`` turns out to be one of its files."""
    from mmdetect.io.output import expect

    return expect(path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, binary: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds (``io.output``)."""
    from mmdetect.io.output import atomic_write

    with atomic_write(path, binary=binary) as fh:
        yield fh


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to a regular file (created if absent), e.g. $GITHUB_STEP_SUMMARY; OutputError otherwise.

    Never opens anything but a regular file: a FIFO would block, a device would take the bytes.
    """
    target = Path(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot append to {path}: {exc.strerror or exc}") from exc
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"cannot append to {path}: it is not a regular file")
    try:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise OutputError(f"cannot append to {path}: {exc.strerror or exc}") from exc


# -- documents ------------------------------------------------------------------------------------------------------

def clean(value: Any) -> Any:
    """JSON-ready: NaN and infinities as None, numpy scalars as Python values, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return clean(value.item())
    return value


def metadata(data: Any) -> dict[str, Any]:
    """The provenance and per-layer summary of a table's ``attrs``."""
    return clean({"provenance": data.attrs.get("provenance", {}), "layers": data.attrs.get("layers", [])})


def document(data: Any, key: str = "neurons") -> dict[str, Any]:
    """The JSON document of a table: provenance, per-layer summary, any other ``attrs``, then the rows under
    ``key`` (``neurons`` for a scan, ``heads``, ``chains``)."""
    from mmdetect.report.json_rows import records

    extra = {k: clean(v) for k, v in data.attrs.items() if k not in ("provenance", "layers")}
    return {**metadata(data), **extra, key: records(data)}


def dumps(doc: Any, indent: int | None = None) -> str:
    """One JSON text, strictly valid (no NaN): compact without ``indent``, as the row documents are."""
    return _encode(clean(doc), indent)


def _encode(doc: Any, indent: int | None = None) -> str:
    # check_circular off: these documents are trees built here, and the check costs time on a scan's records.
    encoder = json.JSONEncoder(indent=indent, separators=COMPACT if indent is None else None, allow_nan=False,
                               check_circular=False)
    return encoder.encode(doc) + "\n"


def write_document(doc: Any, path: str | os.PathLike | None = None, indent: int | None = 1) -> None:
    """A JSON document (explain's, a sweep record, ``archs --format json``) to ``path`` atomically, or stdout."""
    write_text(dumps(doc, indent), path)


# -- tables ---------------------------------------------------------------------------------------------------------

def _markdown(df: Any) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return FLOAT_FORMAT % v  # the same digits as the other formats: every format carries the same rows
        return str(v).replace("|", "\\|")

    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    prov = df.attrs.get("provenance")
    head = ""
    if prov:
        head = (f"Model `{prov.get('model')}` ({prov.get('model_type')}), {prov.get('convention')} convention, "
                f"threshold {prov.get('threshold')}, mmdetect {prov.get('version')}.\n\n")
    return head + "\n".join(lines) + "\n"


def _writers() -> dict[str, tuple[bool, Callable[..., None]]]:
    """{format: (binary, writer(rows, fh))}."""
    def csv(rows: Any, fh: IO[Any], sep: str = ",") -> None:
        # pyarrow's C++ writer, much faster than DataFrame.to_csv (docs/performance.md). Floats are written as the
        # shortest repr of
        # their float32 value: the cosines are computed in float32, so no digit that means anything is lost.
        import pyarrow.csv as pa_csv

        from mmdetect.report.arrow import arrow_table

        pa_csv.write_csv(arrow_table(rows, float32=True), fh,
                         pa_csv.WriteOptions(delimiter=sep, quoting_style="needed"))

    def as_json(rows: Any, fh: IO[Any], key: str = "neurons") -> None:
        # orjson: a scan's rows are hundreds of thousands of records, which the json module encodes several times
        # slower (docs/performance.md).
        # document() cleans what needs it (NaN -> None); the records are clean already.
        import orjson

        fh.write(orjson.dumps(document(rows, key)) + b"\n")

    def jsonl(rows: Any, fh: IO[Any]) -> None:
        import orjson

        from mmdetect.report.json_rows import records

        fh.write(b"".join(orjson.dumps(record) + b"\n" for record in records(rows)))

    def parquet(rows: Any, fh: IO[Any]) -> None:
        import pyarrow.parquet as pq

        from mmdetect.report.arrow import arrow_table

        table = arrow_table(rows)
        meta = dict(table.schema.metadata or {})
        meta[b"mmdetect"] = json.dumps(metadata(rows)).encode()
        pq.write_table(table.replace_schema_metadata(meta), fh)

    return {
        "csv": (True, csv),
        "tsv": (True, functools.partial(csv, sep="\t")),
        "json": (True, as_json),
        "jsonl": (True, jsonl),
        "markdown": (False, lambda rows, fh: fh.write(_markdown(rows))),
        "parquet": (True, parquet),
    }


def write(rows: ScanResult | pd.DataFrame | list[dict[str, Any]], fmt: str, path: str | os.PathLike | None = None, *,
          key: str = "neurons") -> None:
    """Write ``rows`` (all of them) in ``fmt`` to ``path`` atomically, or to stdout when ``path`` is None.

    ``rows`` is a ``ScanResult`` (CSV, TSV, JSON and JSONL are then written from its numpy columns without pandas,
    the same bytes as from its DataFrame), a DataFrame, or a list of dicts (CSV and TSV). JSON keeps the rows
    under ``key``.
    """
    writers = _writers()
    if fmt not in writers:
        raise MMDetectError(f"unknown format {fmt!r}: use one of {', '.join(FILE_FORMATS)}")
    binary, writer = writers[fmt]
    if fmt == "json":
        writer = functools.partial(writer, key=key)
    if fmt in ("parquet", "markdown") and isinstance(rows, ScanResult):
        rows = rows.to_frame()
    if path is None:
        if fmt == "parquet":
            raise MMDetectError(f"--format {fmt} is binary: give --output PATH")
        from mmdetect.io.output import sigint_deferred

        buf: Any = io.BytesIO() if binary else io.StringIO()
        with sigint_deferred() as interrupted:  # Ctrl-C inside a C serialiser can crash the interpreter
            writer(rows, buf)
        if interrupted():
            raise KeyboardInterrupt
        if binary:
            _emit_bytes(buf.getvalue())
        else:
            write_text(buf.getvalue())
        return
    with atomic_open(path, binary=binary) as fh:
        writer(rows, fh)


def write_text(text: str, path: str | os.PathLike | None = None) -> None:
    """``text`` to ``path`` atomically, or to stdout."""
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_open(path) as fh:
        fh.write(text)


def _emit_bytes(data: bytes) -> None:
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # a text-only stream (e.g. click's test runner in some modes)
        sys.stdout.write(data.decode())
    else:
        out.write(data)
        out.flush()
    sys.stdout.flush()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Provenance and layer summary stored in a JSON or Parquet output."""
    fmt = infer_format(path)
    if fmt == "json":
        doc = json.loads(Path(path).read_text())
        return {"provenance": doc.get("provenance", {}), "layers": doc.get("layers", [])}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return json.loads(pq.read_schema(path).metadata[b"mmdetect"])
    raise MMDetectError(f"{path}: only JSON and Parquet outputs carry provenance")
