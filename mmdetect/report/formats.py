"""Rows -> rich table | csv | tsv | json | jsonl | parquet | markdown. The only module that branches on format.

File formats carry every row they are given; provenance goes into the JSON document and the Parquet schema metadata,
never into CSV (which stays plain for ``pandas.read_csv``). Files are written to a temporary file beside the target
and renamed over it, so a failed run never leaves a partial file or clobbers an existing one.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from mmdetect.errors import MMDetectError

FILE_FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "markdown")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet", ".pq": "parquet", ".md": "markdown", ".markdown": "markdown",
              ".html": "html", ".htm": "html"}  # html: the report page (report/build.py), not a row format
FLOAT_FORMAT = "%.8g"


def infer_format(path: str | os.PathLike) -> str:
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        raise MMDetectError(f"cannot tell the format of {path} from its extension: add --format "
                            f"({', '.join(FILE_FORMATS)})")
    return fmt


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any scanning, if ``path`` cannot be written."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise MMDetectError(f"--output {path} is a directory: give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise MMDetectError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise MMDetectError(f"cannot write {path}: permission denied; choose another --output")
    return target


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, binary: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds."""
    target = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
        if target.exists():
            os.chmod(tmp, target.stat().st_mode & 0o777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return clean(value.item())
    return value


def metadata(df: Any) -> dict[str, Any]:
    return clean({"provenance": df.attrs.get("provenance", {}), "layers": df.attrs.get("layers", [])})


def _records_json(df: Any, lines: bool) -> str:
    text = df.to_json(orient="records", lines=lines, double_precision=10)
    return text if not lines or text.endswith("\n") or not text else text + "\n"


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


def _is_scan_result(data: Any) -> bool:
    """A ``scanner.ScanResult`` (numpy columns) rather than a DataFrame. Duck-typed: importing scanner here would
    pull torch into every report."""
    return hasattr(data, "to_frame") and not hasattr(data, "iloc")


def _expert_strings(values: Any) -> list:
    """The expert column mixes indices and labels ("shared"); as text it is one type: None, "3", "shared"."""
    return [None if v is None or v != v else str(v) for v in values]


def _arrow_table(data: Any, float32: bool = False) -> Any:
    """A pyarrow Table of a DataFrame or of a scan's numpy columns (``scanner.ScanResult``), in column order."""
    import numpy as np
    import pyarrow as pa

    if not _is_scan_result(data):  # a DataFrame
        import pandas as pd

        frame = data.copy()
        frame.attrs = {}
        if "expert" in frame:
            frame["expert"] = pd.array(_expert_strings(frame["expert"]), dtype="string")
        if float32:
            floats = frame.select_dtypes("float64").columns
            frame[floats] = frame[floats].astype("float32")
        return pa.Table.from_pandas(frame, preserve_index=False)
    dead = ~np.isfinite(data.columns["cos"])
    names, arrays = [], []
    for name, col in data.columns.items():
        if col.dtype == object:  # class, and expert (None, an index, or a label such as "shared")
            arr = _string_array(col)
        elif name == "rank":
            arr = _buffers_array(col, ~dead)
        else:
            if float32 and col.dtype == np.float64:
                col = col.astype(np.float32)
            arr = _buffers_array(col, ~np.isnan(col) if col.dtype.kind == "f" else None)
        names.append(name)
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, names=names)


# Arrow arrays built from raw buffers: pa.array() on numpy data imports pandas (to recognise its types), which would
# cost the command line a quarter of a second for nothing. NaN becomes null, as in pandas' own conversion.

def _validity(valid: Any) -> Any:
    import numpy as np
    import pyarrow as pa

    return None if valid is None or valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))


def _buffers_array(col: Any, valid: Any) -> Any:
    import numpy as np
    import pyarrow as pa

    types = {"f4": pa.float32(), "f8": pa.float64(), "i8": pa.int64(), "i4": pa.int32(), "b1": pa.bool_()}
    col = np.ascontiguousarray(col)
    kind = f"{col.dtype.kind}{col.dtype.itemsize}"
    data = np.packbits(col, bitorder="little") if kind == "b1" else col
    return pa.Array.from_buffers(types[kind], len(col), [_validity(valid), pa.py_buffer(data)])


def _string_array(values: Any) -> Any:
    import numpy as np
    import pyarrow as pa

    encoded = [b"" if v is None else str(v).encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded)), out=offsets[1:])
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(encoded))
    return pa.Array.from_buffers(pa.string(), len(encoded), [_validity(valid), pa.py_buffer(offsets),
                                                              pa.py_buffer(b"".join(encoded))])


def _writers() -> dict[str, tuple[bool, Callable[[Any, IO[Any]], None]]]:
    def csv(df: Any, fh: IO[Any], sep: str = ",") -> None:
        # pyarrow's C++ writer is ~9x faster than DataFrame.to_csv. Floats are written as the shortest repr of
        # their float32 value: the cosines are computed in float32, so no digit that means anything is lost.
        import pyarrow.csv as pa_csv

        table = _arrow_table(df, float32=True)
        pa_csv.write_csv(table, fh, pa_csv.WriteOptions(delimiter=sep, quoting_style="needed"))

    def as_json(df: Any, fh: IO[Any]) -> None:
        meta = metadata(df)
        fh.write('{"provenance": ' + json.dumps(meta["provenance"]) + ',\n "layers": ' + json.dumps(meta["layers"])
                 + ',\n "neurons": ' + _records_json(df, lines=False) + "}\n")

    def parquet(df: Any, fh: IO[Any]) -> None:
        import pyarrow.parquet as pq

        table = _arrow_table(df)
        meta = dict(table.schema.metadata or {})
        meta[b"mmdetect"] = json.dumps(metadata(df)).encode()
        pq.write_table(table.replace_schema_metadata(meta), fh)

    return {
        "csv": (True, csv),
        "tsv": (True, lambda df, fh: csv(df, fh, sep="\t")),
        "json": (False, as_json),
        "jsonl": (False, lambda df, fh: fh.write(_records_json(df, lines=True))),
        "markdown": (False, lambda df, fh: fh.write(_markdown(df))),
        "parquet": (True, parquet),
    }


def write(df: Any, fmt: str, path: str | os.PathLike | None = None) -> None:
    """Write ``df`` (all its rows) in ``fmt`` to ``path`` atomically, or to stdout when ``path`` is None.

    ``df`` is a DataFrame, or a ``scanner.ScanResult``: CSV and TSV are then written from its numpy columns without
    pandas (the same bytes); the other formats convert it to a DataFrame first.
    """
    writers = _writers()
    if fmt not in writers:
        raise MMDetectError(f"unknown format {fmt!r}: use one of {', '.join(FILE_FORMATS)}")
    binary, writer = writers[fmt]
    if fmt not in ("csv", "tsv") and _is_scan_result(df):
        df = df.to_frame()
    if path is None:
        if fmt == "parquet":
            raise MMDetectError(f"--format {fmt} is binary: give --output PATH")
        buf = io.BytesIO() if binary else io.StringIO()
        writer(df, buf)
        sys.stdout.flush()
        if binary:
            out = getattr(sys.stdout, "buffer", None)
            if out is None:  # a text-only stream (e.g. click's test runner in some modes)
                sys.stdout.write(buf.getvalue().decode())
            else:
                out.write(buf.getvalue())
                out.flush()
        else:
            sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
        return
    with atomic_open(path, binary=binary) as fh:
        writer(df, fh)


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


# -- the terminal view ----------------------------------------------------------------------------------------------

def fmt_cell(v: Any, digits: int = 3) -> str:
    """A terminal-table cell: signed fixed-point floats, blank for missing values."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:+.{digits}f}" if abs(v) < 1000 else f"{v:.3g}"
    return str(v)


def render(df: Any, top: int = 20, console: Any = None) -> None:
    """The top ``top`` rows and the per-layer summary as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    prov = df.attrs.get("provenance", {})
    n_flagged = int(df["flagged"].sum()) if len(df) else 0
    title = (f"{prov.get('model', '?')} · {prov.get('model_type', '?')} · {prov.get('convention', '?')} convention · "
             f"{len(df):,} neurons · {n_flagged:,} flagged (cos ≤ {prov.get('threshold', '?')})")
    gated = bool(df["cos_gate_in"].notna().any()) if len(df) else False
    moe = bool(df["expert"].notna().any()) if len(df) else False
    table = Table(title=title, title_justify="left", header_style="bold")
    cols = ["rank", "layer"] + (["expert"] if moe else []) + ["neuron", "cos"] + \
        (["cos_gate_out", "cos_gate_in"] if gated else []) + ["z", "class"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("class", "expert") else "right")
    for row in df.head(top).to_dict(orient="records"):
        style = "bold red" if row["flagged"] else None
        table.add_row(*[fmt_cell(row[c], 2 if c == "z" else 3) if c not in ("rank", "layer", "neuron") else
                        ("" if row[c] is None or row[c] != row[c] else str(row[c])) for c in cols], style=style)
    console.print(table)
    layers = df.attrs.get("layers", [])
    if layers:
        summary = Table(title="Per layer (cos quantiles; null = 95% band of random directions, empirical = "
                              "mismatched neuron pairs)", title_justify="left", header_style="bold")
        for col in ("layer", "neurons", "flagged", "share", "min", "q05", "median", "null band", "empirical"):
            summary.add_column(col, justify="right")
        for s in layers:
            summary.add_row(str(s["layer"]), f"{s['n_neurons']:,}", f"{s['n_flagged']:,}",
                            f"{100 * s['share_flagged']:.1f}%", fmt_cell(s["min"]), fmt_cell(s["q05"]), fmt_cell(s["median"]),
                            f"±{s['null_hi']:.3f}", f"{fmt_cell(s['emp_null_lo'])}…{fmt_cell(s['emp_null_hi'])}")
        console.print(summary)
