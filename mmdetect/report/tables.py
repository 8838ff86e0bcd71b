"""Terminal views: the scan's rich tables, and drawing any view on the terminal or into a file (``--format table
-o``); and ``emit``, the one tail every row command shares: a view on the terminal, or every row in a file format."""
from __future__ import annotations

import math
import os
from typing import Any, Callable

from mmdetect.report.formats import atomic_open, write

Draw = Callable[[Any], None]  # draw(console): print a view on a rich Console


def fmt_cell(v: Any, digits: int = 3) -> str:
    """A terminal-table cell: signed fixed-point floats, blank for missing values."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:+.{digits}f}" if abs(v) < 1000 else f"{v:.3g}"
    return str(v)


def render_to(path: str | os.PathLike | None, draw: Draw) -> None:
    """Call ``draw(console)`` on the terminal, or on a 140-column console writing ``path`` atomically."""
    from rich.console import Console

    if path is None:
        draw(Console())
        return
    with atomic_open(path) as fh:
        draw(Console(file=fh, width=140))


def emit(rows: Any, fmt: str, output: str | os.PathLike | None, draw: Draw, *, key: str = "neurons") -> int | None:
    """``draw`` the terminal view (``fmt`` table, to the terminal or ``output``), or write every row in ``fmt``.

    Returns the number of rows written to a file, None otherwise (nothing to report on stderr).
    """
    if fmt == "table":
        render_to(output, draw)
        return None
    write(rows, fmt, output, key=key)
    return len(rows) if output else None


def render(df: Any, top: int = 20, console: Any = None) -> None:
    """The top ``top`` rows of a scan and its per-layer summary as rich tables."""
    from rich.console import Console
    from rich.table import Table

    if "feature" in df.columns:
        return render_features(df, top=top, console=console)
    console = console or Console()
    prov = df.attrs.get("provenance", {})
    n_flagged = int(df["flagged"].sum()) if len(df) else 0
    title = (f"{prov.get('model', '?')} · {prov.get('model_type', '?')} · {prov.get('convention', '?')} convention · "
             f"{len(df):,} neurons · {n_flagged:,} flagged (cos ≤ {prov.get('threshold', '?')})")
    gated = bool(df["cos_gate_in"].notna().any()) if len(df) else False
    moe = bool(df["expert"].notna().any()) if len(df) else False
    table = Table(title=title, title_justify="left", header_style="bold")
    cols = ["rank", "layer"] + (["expert"] if moe else []) + ["neuron", "cos"] + \
        (["cos_gate_out", "cos_gate_in"] if gated else []) + ["z", "z_layer", "class"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("class", "expert") else "right")
    for row in df.head(top).to_dict(orient="records"):
        style = "bold red" if row["flagged"] else None
        table.add_row(*[fmt_cell(row.get(c), 2 if c in ("z", "z_layer") else 3)
                        if c not in ("rank", "layer", "neuron")
                        else ("" if row[c] is None or row[c] != row[c] else str(row[c])) for c in cols], style=style)
    console.print(table)
    layers = df.attrs.get("layers", [])
    if layers:
        summary = Table(title="Per layer (cos quantiles; MAD = median |cos - median|, z_layer's scale; null = 95% "
                              "band of random directions, empirical = mismatched neuron pairs)", title_justify="left",
                        header_style="bold")
        for col in ("layer", "neurons", "flagged", "share", "min", "q05", "median", "MAD", "null band", "empirical"):
            summary.add_column(col, justify="right")
        for s in layers:
            summary.add_row(str(s["layer"]), f"{s['n_neurons']:,}", f"{s['n_flagged']:,}",
                            f"{100 * s['share_flagged']:.1f}%", fmt_cell(s["min"]), fmt_cell(s["q05"]),
                            fmt_cell(s["median"]), fmt_cell(s.get("mad")), f"±{s['null_hi']:.3f}",
                            f"{fmt_cell(s['emp_null_lo'])}…{fmt_cell(s['emp_null_hi'])}")
        console.print(summary)


def render_features(df: Any, top: int = 20, console: Any = None) -> None:
    """A transcoder scan (``scan --transcoder``): the top ``top`` features, with their Neuronpedia links where the
    transcoder names its Neuronpedia id, and the per-layer summary (the model's own neurons and the skip path's
    copying score beside the features, where they were computed)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    prov = df.attrs.get("provenance", {})
    layers = df.attrs.get("layers", [])
    links = {s["layer"]: s.get("neuronpedia") for s in layers}
    n_flagged = int(df["flagged"].sum()) if len(df) else 0
    title = (f"{prov.get('options', {}).get('transcoder', '?')} on {prov.get('model', '?')} · "
             f"{prov.get('convention', '?')} convention · {len(df):,} features · {n_flagged:,} flagged "
             f"(cos ≤ {prov.get('threshold', '?')})")
    table = Table(title=title, title_justify="left", header_style="bold")
    cols = ["rank", "layer", "feature", "cos", "z", "z_layer", "class"]
    show_links = any(links.values())
    for col in cols + (["neuronpedia"] if show_links else []):
        table.add_column(col, justify="left" if col in ("class", "neuronpedia") else "right")
    for row in df.head(top).to_dict(orient="records"):
        cells = [fmt_cell(row.get(c), 2 if c in ("z", "z_layer") else 3) if c not in ("rank", "layer", "feature")
                 else ("" if row[c] is None or row[c] != row[c] else str(row[c])) for c in cols]
        if show_links:
            link = links.get(row["layer"])
            cells.append(link.format(feature=row["feature"]) if link else "")
        table.add_row(*cells, style="bold red" if row["flagged"] else None)
    console.print(table)
    if not layers:
        return
    neurons = any(s.get("n_neurons") is not None for s in layers)
    skip = any(s.get("skip_copying") is not None for s in layers)
    summary = Table(title="Per layer (features' cos; null = 95% band of random directions, empirical = mismatched "
                          "feature pairs" + ("; neurons: the model's own MLP at that layer" if neurons else "")
                          + ("; skip: copying score of W_skip, as heads scores an OV circuit" if skip else "") + ")",
                    title_justify="left", header_style="bold")
    head = ["layer", "features", "flagged", "min", "median", "null band", "empirical"]
    head += ["neurons flagged", "neurons min"] if neurons else []
    head += ["skip copying"] if skip else []
    for col in head:
        summary.add_column(col, justify="right")
    for s in layers:
        cells = [str(s["layer"]), f"{s['n_features']:,}", f"{s['n_flagged']:,}", fmt_cell(s["min"]),
                 fmt_cell(s["median"]), f"±{s['null_hi']:.3f}",
                 f"{fmt_cell(s['emp_null_lo'])}…{fmt_cell(s['emp_null_hi'])}"]
        if neurons:
            cells += ["" if s.get("n_neurons") is None else f"{s['neurons_flagged']:,} / {s['n_neurons']:,}",
                      fmt_cell(s.get("neurons_min"))]
        if skip:
            cells.append(fmt_cell(s.get("skip_copying")))
        summary.add_row(*cells)
    console.print(summary)


def render_archs(rows: list[dict[str, Any]], unsupported: dict[str, str], what: str, console: Any = None) -> None:
    """``mmdetect archs``: one row per registered layout, the attention-heads verdict once per model type, and the
    model types that are known but refused."""
    from rich.console import Console
    from rich.table import Table

    types = sorted({r["model_type"] for r in rows})
    with_heads = sorted({r["model_type"] for r in rows if r["heads"]})
    table = Table(title=f"{len(types)} supported {what}", title_justify="left", header_style="bold")
    for col in ("model_type", "mlp", "gated", "experts", "pre_norm", "post_norm", "tensors", "heads"):
        table.add_column(col)
    shown = set()
    for r in rows:
        heads = "" if r["model_type"] in shown else "yes" if r["heads"] else f"no: {r['heads_reason']}"
        shown.add(r["model_type"])
        table.add_row(r["model_type"], r["mlp"], "yes" if r["gated"] else "", r["experts"], r["pre_norm"],
                      r["post_norm"], r["tensors"], heads)
    console = console or Console()
    console.print(table)
    console.print(f"[bold]Attention heads:[/bold] {len(with_heads)} of {len(types)} have an attention layout; "
                  f"the heads column gives the reason for the others.")
    if unsupported:
        console.print("[bold]Known but unsupported:[/bold] " + "; ".join(
            f"{k} ({v})" for k, v in sorted(unsupported.items())))
