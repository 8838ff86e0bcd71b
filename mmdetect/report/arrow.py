"""Rows -> a pyarrow Table, for the CSV, TSV and Parquet writers.

A ``ScanResult``'s numpy columns become Arrow arrays from raw buffers: ``pa.array()`` on numpy data imports pandas (to
recognise its types), a start-up cost the command line would pay for nothing (docs/performance.md). NaN becomes null,
as in pandas' own conversion. A DataFrame or a list of dicts goes through pyarrow's own converters.
"""
from __future__ import annotations

from typing import Any

from mmdetect.results.rows import ScanResult


def _expert_strings(values: Any) -> list:
    """The expert column mixes indices and labels ("shared"); as text it is one type: None, "3", "shared"."""
    return [None if v is None or v != v else str(v) for v in values]


def _is_expert(name: Any) -> bool:
    """An expert column: a scan's ``expert``, chains' ``writer_expert`` and ``deleter_expert``."""
    return isinstance(name, str) and (name == "expert" or name.endswith("_expert"))


def arrow_table(data: Any, float32: bool = False) -> Any:
    """A pyarrow Table of a ``ScanResult``, a DataFrame or a list of dicts, in column order.

    ``float32``: float64 columns are cast to float32 first, so CSV writes the shortest text of their float32 value
    (the scan's arithmetic is float32: no digit that means anything is lost).
    """
    import numpy as np
    import pyarrow as pa

    if isinstance(data, list):
        keys = {k for row in data for k in row if _is_expert(k)}
        return pa.Table.from_pylist([{**row, **{k: _expert_strings([row[k]])[0] for k in keys if k in row}}
                                     for row in data] if keys else data)
    if not isinstance(data, ScanResult):  # a DataFrame
        import pandas as pd

        frame = data.copy()
        frame.attrs = {}
        for name in [c for c in frame.columns if _is_expert(c)]:
            frame[name] = pd.array(_expert_strings(frame[name]), dtype="string")
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
