"""Where ``mmdetect activations`` writes: the per-neuron table in any of scan's file formats, and beside it

* ``OUT.details.parquet``: one row per neuron, keyed ``layer, expert, neuron``, with ``hist`` (258 counts: below -10,
  the 256 bins of width 25/256 from -10 to 15, above 15) and ``top`` (the top tokens by post-activation: value,
  window, position, token_id, token, before, after);
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

    d = result.details
    top_type = pa.list_(pa.struct([("value", pa.float64()), ("window", pa.int64()), ("position", pa.int64()),
                                   ("token_id", pa.int64()), ("token", pa.string()), ("before", pa.string()),
                                   ("after", pa.string())]))
    table = pa.table({"layer": pa.array(d["layer"], pa.int64()),
                      "expert": pa.array([_expert(e) for e in d["expert"]], pa.string()),
                      "neuron": pa.array(d["neuron"], pa.int64()),
                      "hist": pa.array(d["hist"], pa.list_(pa.int64())),
                      "top": pa.array(d["top"], top_type)})
    meta = dict(table.schema.metadata or {})
    meta[b"mmdetect"] = json.dumps(result.provenance.to_dict()).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_write(path, binary=True) as fh:
        pq.write_table(table, fh)


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
