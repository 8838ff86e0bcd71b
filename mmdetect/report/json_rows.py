"""Rows -> plain Python records for the JSON and JSONL writers (which hand them to the json module).

The values are those earlier versions wrote with pandas' ``to_json(double_precision=10)``: each float is rounded the
way pandas' encoder rounds it, so a file parses to the same numbers as before. The json module then writes the
shortest text of that number, which is pandas' text except for magnitudes below 1e-4, written with an exponent
(``1.234e-05`` rather than ``0.00001234``): the same value either way.
"""
from __future__ import annotations

from typing import Any

from mmdetect.results.rows import ScanResult

DECIMALS = 10
_SCALE = 10.0 ** DECIMALS
# pandas' encoder (ultrajson's modp_dtoa) writes magnitudes below 1e-15 or above 1e16 - 1 with printf's "%.10g".
_TINY, _HUGE = 1e-15, 1e16 - 1
_EXACT = 2.0 ** 53 / _SCALE  # below this, whole * 1e10 + frac is an exact integer in a double


def pandas_floats(values: Any) -> list[float | None]:
    """Floats as pandas' JSON encoder (double_precision=10) rounds them; None for NaN and infinities."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    size = np.abs(a)
    with np.errstate(invalid="ignore"):
        # Fixed point: the fraction scaled to 10 digits in double arithmetic, then rounded up above one half and,
        # at exactly one half, when the digits so far are 0 or odd (modp_dtoa's rule, not always round()'s).
        whole = np.trunc(size)
        scaled = (size - whole) * _SCALE
        frac = np.floor(scaled)
        diff = scaled - frac
        frac += (diff > 0.5) | ((diff == 0.5) & ((frac == 0) | (np.fmod(frac, 2) == 1)))
        carry = frac >= _SCALE
        whole, frac = whole + carry, np.where(carry, 0.0, frac)
        out = (whole * _SCALE + frac) / _SCALE   # one correctly rounded division: the double nearest the decimal
        out = np.where(a < 0, -out, out)          # -0.0 is written as 0.0
        finite = np.isfinite(a)
        exponent = finite & (size != 0) & ((size < _TINY) | (size > _HUGE))
        large = finite & ~exponent & (size >= _EXACT)
    result: list[float | None] = out.tolist()
    for i in np.flatnonzero(exponent | large).tolist():
        if exponent[i]:
            result[i] = float(f"{a[i]:.10g}")
        else:
            digits = f"{int(whole[i])}.{int(frac[i]):0{DECIMALS}d}"
            result[i] = float(digits) if a[i] >= 0 else -float(digits)
    for i in np.flatnonzero(~finite).tolist():
        result[i] = None
    return result


def _value(v: Any) -> Any:
    """One cell of an object column: numpy scalars as Python values, floats rounded, NaN as None."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float):
        return pandas_floats([v])[0]
    return v


_PLAIN = frozenset({str, int, bool, type(None)})


def _objects(values: list[Any]) -> list[Any]:
    """An object column's cells as JSON values. Most columns (class, expert) hold only str, int and None, which
    pass as they are; anything else (numpy scalars, floats) goes through ``_value``."""
    if set(map(type, values)) <= _PLAIN:
        return values
    return [_value(v) for v in values]


def columns(data: Any) -> dict[str, list[Any]]:
    """{column: Python values}: ints, bools and strings as they are, floats as pandas rounds them, missing as None.

    ``data`` is a ``ScanResult`` (numpy columns; dead neurons have no rank) or a DataFrame of any columns.
    """
    import numpy as np

    out: dict[str, list[Any]] = {}
    if isinstance(data, ScanResult):
        for name, col in data.columns.items():
            if col.dtype.kind == "f":
                out[name] = pandas_floats(col)
            elif col.dtype == object:
                out[name] = _objects(col.tolist())
            else:
                out[name] = col.tolist()
        dead = (~np.isfinite(data.columns["cos"])).tolist()
        out["rank"] = [None if d else r for r, d in zip(out["rank"], dead)]
        return out
    import pandas as pd

    for name in data.columns:
        col = data[name]
        if col.dtype.kind == "f":
            out[str(name)] = pandas_floats(col.to_numpy(dtype=np.float64, na_value=np.nan))
        elif col.dtype.kind in "iub" and not isinstance(col.dtype, pd.api.extensions.ExtensionDtype):
            out[str(name)] = col.to_numpy().tolist()
        else:  # object, string and nullable (Int64, boolean) columns; na_value turns NaN, None and pd.NA into None
            out[str(name)] = _objects(col.to_numpy(dtype=object, na_value=None).tolist())
    return out


def records(data: Any) -> list[dict[str, Any]]:
    """One dict per row, in column order."""
    cols = columns(data)
    names = list(cols)
    return [dict(zip(names, row)) for row in zip(*cols.values())]
