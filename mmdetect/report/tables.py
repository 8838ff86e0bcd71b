"""Writing the row tables of ``heads`` and ``chains``: every format of ``scan`` (through ``report``), but the JSON
document names its rows after what they are (``"heads"``, ``"chains"``) instead of ``"neurons"``."""
from __future__ import annotations

import json
import sys
from typing import Any

from mmdetect import report


def json_document(df: Any, key: str) -> str:
    meta = report.metadata(df)
    extra = {k: report.clean(v) for k, v in df.attrs.items() if k not in ("provenance", "layers")}
    head = '{"provenance": ' + json.dumps(meta["provenance"]) + ',\n "layers": ' + json.dumps(meta["layers"])
    for name, value in extra.items():
        head += f',\n "{name}": ' + json.dumps(value)
    records = df.to_json(orient="records", double_precision=10) if len(df) else "[]"
    return head + f',\n "{key}": ' + records + "}\n"


def write_rows(df: Any, fmt: str, path: str | None, key: str) -> None:
    """``df`` in ``fmt`` to ``path`` (atomically) or stdout; JSON keeps its rows under ``key``."""
    if fmt != "json":
        report.write(df, fmt, path)
        return
    text = json_document(df, key)
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with report.atomic_open(path) as fh:
        fh.write(text)


def render_to(path: str | None, draw: Any) -> None:
    """Call ``draw(console)`` on the terminal, or on a 140-column console writing ``path`` atomically."""
    from rich.console import Console

    if path is None:
        draw(Console())
        return
    with report.atomic_open(path) as fh:
        draw(Console(file=fh, width=140))

