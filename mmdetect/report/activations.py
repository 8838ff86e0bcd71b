"""Where ``mmdetect activations`` writes: the per-neuron table in any of scan's file formats, and beside it

* ``OUT.details.parquet``: one row per neuron, keyed ``layer, expert, neuron``, with ``hist`` (258 counts: below -10,
  the 256 bins of width 25/256 from -10 to 15, above 15) and ``top`` (the top tokens by post-activation: value,
  window, position, token_id, token, before, after), and every column of the table again, so that this one file is
  what other commands read back (``read_stats``): its metadata holds the run's provenance, the format version, the
  row count and a SHA-256 of its columns, checked on reading;
* ``OUT.state``: the run's saved state (its running sums), which a stopped run resumes from and
  ``mmdetect merge-activations`` adds up.

Every file is written atomically (a temporary file beside it, then a rename).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmdetect.corpus.activations import Result
from mmdetect.io.output import atomic_write
from mmdetect.report.formats import write

DETAIL_SUFFIX = ".details.parquet"
STATE_SUFFIX = ".state"
DETAILS_FORMAT = "mmdetect-activations-details/1"
KEYS = ("layer", "expert", "neuron")


def details_path(output: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(output)}{DETAIL_SUFFIX}")


def state_path(output: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(output)}{STATE_SUFFIX}")


def _expert(value: Any) -> str | None:
    return None if value is None else str(value)


def write_details(result: Result, path: str | os.PathLike) -> None:
    """The companion Parquet file (schema in the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, frame = result.details, result.frame
    top_type = pa.list_(pa.struct([("value", pa.float64()), ("window", pa.int64()), ("position", pa.int64()),
                                   ("token_id", pa.int64()), ("token", pa.string()), ("before", pa.string()),
                                   ("after", pa.string())]))
    columns = {"layer": pa.array(d["layer"], pa.int64()),
               "expert": pa.array([_expert(e) for e in d["expert"]], pa.string()),
               "neuron": pa.array(d["neuron"], pa.int64()),
               "hist": d["hist"].arrow(pa.list_(pa.int64())) if hasattr(d["hist"], "arrow")
               else pa.array(d["hist"], pa.list_(pa.int64())),
               "top": d["top"].arrow(top_type) if hasattr(d["top"], "arrow") else pa.array(d["top"], top_type)}
    for name in frame.columns:
        if name not in KEYS:
            columns[name] = pa.array(frame[name].to_numpy(), pa.int64() if name == "tokens" else pa.float64())
    table = pa.table(columns)
    meta = dict(table.schema.metadata or {})
    meta[b"mmdetect"] = json.dumps(result.provenance.to_dict()).encode()
    meta[b"mmdetect_details"] = json.dumps({"format": DETAILS_FORMAT, "rows": table.num_rows,
                                            "sha256": _table_digest(table)}).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_write(path, binary=True) as fh:
        pq.write_table(table, fh)


def _table_digest(table: Any) -> str:
    """SHA-256 over every column's values (names, flattened values and list lengths): the same for a table and its
    Parquet round trip, whatever the chunking."""
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc

    h = hashlib.sha256()

    def feed(name: str, col: Any) -> None:
        h.update(f"{name}:{len(col)}:{col.null_count}".encode())  # list types' child names differ after a round trip
        if pa.types.is_list(col.type):
            feed(f"{name}.len", pc.list_value_length(col).fill_null(-1))
            feed(f"{name}[]", pc.list_flatten(col))
        elif pa.types.is_struct(col.type):
            for i, field in enumerate(col.type):
                feed(f"{name}.{field.name}", pc.struct_field(col, [i]))
        elif pa.types.is_string(col.type):
            h.update(json.dumps(col.to_pylist()).encode())
        else:
            h.update(str(col.type).encode())
            h.update(col.fill_null(0).to_numpy(zero_copy_only=False).tobytes())

    for name in table.column_names:
        feed(name, table.column(name).combine_chunks())
    return h.hexdigest()


def read_stats(path: str | os.PathLike) -> Result:
    """The result of ``mmdetect activations`` (or ``merge-activations``) written at ``path``, read back from its
    details file and checked: NotFoundError or CorruptInputError (one line) when it is missing, not mmdetect's,
    of another format version, truncated or edited. ``path`` is the table (OUT) or OUT.details.parquet itself."""
    import pandas as pd
    import pyarrow.parquet as pq

    from mmdetect.corpus.activations import COLUMNS
    from mmdetect.errors import CorruptInputError, NotFoundError
    from mmdetect.io.paths import open_regular
    from mmdetect.results.provenance import Provenance

    where = Path(path)
    details = where if where.name.endswith(DETAIL_SUFFIX) else details_path(where)
    if not details.exists():
        raise NotFoundError(f"{details} is missing: give the output of `mmdetect activations` (OUT, with "
                            f"OUT.details.parquet beside it)")
    bad = f"{details} is not a usable mmdetect activations output"
    with os.fdopen(open_regular(details), "rb") as fh:
        try:
            table = pq.read_table(fh)
            meta = table.schema.metadata or {}
            info = json.loads(meta[b"mmdetect_details"])
            prov = Provenance.from_dict(json.loads(meta[b"mmdetect"]))
        except KeyError:
            raise CorruptInputError(f"{bad} (no mmdetect metadata): rerun `mmdetect activations`") from None
        except Exception as exc:
            raise CorruptInputError(f"{bad} ({type(exc).__name__}: {str(exc)[:100]}); rerun `mmdetect "
                                    f"activations`") from None
    if not isinstance(info, dict) or info.get("format") != DETAILS_FORMAT:
        got = info.get("format") if isinstance(info, dict) else None
        raise CorruptInputError(f"{bad}: it is format {got!r}, this mmdetect reads {DETAILS_FORMAT}; rerun "
                                f"`mmdetect activations` with this version")
    missing = [c for c in (*COLUMNS, "hist", "top") if c not in table.column_names]
    if missing:
        raise CorruptInputError(f"{bad}: column {missing[0]} is missing; rerun `mmdetect activations`")
    if info.get("rows") != table.num_rows or info.get("sha256") != _table_digest(table.replace_schema_metadata()):
        raise CorruptInputError(f"{bad}: its rows do not match its recorded row count and checksum (edited or "
                                f"damaged); rerun `mmdetect activations`")
    frame = pd.DataFrame({c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS})
    frame["expert"] = frame["expert"].astype(object).where(frame["expert"].notna(), None)
    frame.attrs["provenance"] = prov.to_dict()
    extra = {c: table.column(c).to_pylist() for c in ("layer", "expert", "neuron", "hist", "top")}
    return Result(frame, extra, prov)


def write_result(result: Result, fmt: str, output: str | os.PathLike) -> list[Path]:
    """The table (``fmt``) at ``output`` and its companion beside it; the paths written."""
    companion = details_path(output)
    write_details(result, companion)
    write(result.frame, fmt, output)
    return [Path(output), companion]


def _contexts(path: Path) -> dict[int, dict[str, Any]]:
    """token key -> its context text, from a shard's details file (the same for every neuron)."""
    import pyarrow.parquet as pq

    from mmdetect.errors import CorruptInputError, NotFoundError

    if not path.is_file():
        raise NotFoundError(f"{path} is missing: merge-activations needs each shard's OUT.details.parquet beside it")
    try:
        table = pq.read_table(path, columns=["top"])
        meta = json.loads((table.schema.metadata or {}).get(b"mmdetect", b"{}"))
    except Exception as exc:
        raise CorruptInputError(f"{path} is not an mmdetect details file ({type(exc).__name__}); rerun that "
                                f"shard") from None
    seq_len = int((meta.get("options") or {}).get("seq_len") or 0)
    out: dict[int, dict[str, Any]] = {}
    for row in table.column("top").to_pylist():
        for e in row or ():
            key = int(e["window"]) * seq_len + int(e["position"])
            if key not in out and e.get("token") is not None:
                out[key] = {k: e[k] for k in ("token_id", "token", "before", "after")}
    return out


def merge_outputs(parts: list[str], output: str | os.PathLike) -> Result:
    """The result of one run from its shards' outputs (their states and details files beside them)."""
    from mmdetect.corpus import state as saved
    from mmdetect.corpus.activations import merge_states
    from mmdetect.errors import NotFoundError, UsageError

    if os.path.realpath(output) in {os.path.realpath(p) for p in parts}:
        raise UsageError(f"-o {output} is one of the shards: write the merge to another file")
    states, tops = [], {}
    for part in parts:
        path = state_path(part)
        if not path.is_file():
            raise NotFoundError(f"{path} is missing: merge the outputs of `mmdetect activations --shard` with their "
                                f"OUT.state beside them")
        states.append(saved.load(path))
        tops.update(_contexts(details_path(part)))
    return merge_states(states, parts, tops)
