"""Terminal views: the scan's rich tables, and drawing any view on the terminal or into a file (``--format table
-o``); and ``emit``, the one tail every row command shares: a view on the terminal, or every row in a file format."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal

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


@dataclass
class Column:
    """One column of a terminal table: its cells as text, and how it may shrink at narrow widths."""
    name: str
    cells: list[str]
    justify: Literal["left", "right"] = "right"
    short: str | None = None    # the header at narrow widths ("gate_out" for "cos_gate_out")
    words: bool = False         # text that may wrap between its words at narrow widths (never inside one)


def fit(console: Any, columns: list[Column], drop: list[str], *, styles: list[str | None] | None = None,
        hint: str = "", **table_options: Any) -> Any:
    """The rich Table of ``columns`` that fits ``console``'s width, without cutting a cell.

    Layouts are tried from the widest to the narrowest, the first that fits is kept: every column as it is; text
    columns wrapped between words (as wide as the room left allows); also the short headers; then, with both, the
    columns of ``drop`` left out one by one, in that order (the least important first). A caption under the table
    names what was left out and ``hint`` says where to see it. When even the narrowest is too wide, cells fold onto
    a second line rather than end in an ellipsis.
    """
    from rich.cells import cell_len
    from rich.measure import Measurement
    from rich.table import Table

    def build(wrap: bool, short: bool, left_out: list[str], room: int = 0) -> Any:
        caption = None
        if left_out:
            caption = f"not shown at {console.width} columns: {', '.join(left_out)}" + (f"; {hint}" if hint else "")
        table = Table(caption=caption, caption_justify="left", **table_options)
        kept = [c for c in columns if c.name not in left_out]
        for c in kept:
            header = c.short if short and c.short else c.name
            width = None
            if wrap and c.words:  # its longest word, plus what room the table leaves, up to its longest cell
                least = max([cell_len(header)] + [cell_len(w) for cell in c.cells for w in cell.split()])
                width = min(least + room, max([cell_len(header)] + [cell_len(cell) for cell in c.cells]))
                room -= width - least
            table.add_column(header, justify=c.justify, width=width, overflow="fold")
        for k in range(len(columns[0].cells) if columns else 0):
            table.add_row(*[c.cells[k] for c in kept], style=styles[k] if styles else None)
        return table

    layouts: list[tuple[bool, bool, list[str]]] = [(False, False, []), (True, False, [])]
    layouts += [(True, True, drop[:k]) for k in range(len(drop) + 1)]
    wide = console.options.update_width(1 << 20)
    for wrap, short, left_out in layouts:
        table = build(wrap, short, left_out)
        width = Measurement.get(console, wide, table).maximum
        if width <= console.width:
            return build(wrap, short, left_out, console.width - width) if wrap else table
    return table


def _share(v: Any) -> str:
    return "" if v is None or v != v else f"{100 * v:.0f}%"


def _rho(rho: Any, p: Any) -> str:
    if rho is None or rho != rho:
        return ""
    return f"{rho:+.2f}" if p != p else f"{rho:+.2f} ({p:.0e})" if p > 0 else f"{rho:+.2f} (<1e-300)"


def _count(v: Any) -> str:
    return "" if v is None or v != v else str(v)


def render(df: Any, top: int = 20, console: Any = None, name: str | None = None) -> None:
    """The top ``top`` rows of a scan and its per-layer summary as rich tables, fitted to the console's width.

    name: the model's name for the header (the CLI gives ``io.checkpoint.display_name``: a hub id, the config's
    name, a GGUF's ``general.name``); default: the model reference in the provenance.

    No number is ever cut. At a narrow width (80 columns: a pipe, a CI log) the tables first shorten headers
    (``cos_gate_out`` -> ``gate_out``, ``cos_gate_in`` -> ``gate_in``; ``neurons`` -> ``n``, ``flagged`` -> ``flag``,
    ``null band`` -> ``null``, ``empirical`` -> ``emp``) and wrap ``class`` between words, then leave out columns,
    the least important first, and say which under the table (``fit``):

    - candidates: ``z`` (at one d_model a rescaled cos), ``cos_gate_in``, ``cos_gate_out`` (both summed up by
      ``class``), ``z_layer``, ``rank``, ``class``; ``layer``, ``expert``, ``neuron`` and ``cos`` always stay.
    - per layer: ``empirical`` (the second null band), ``neurons`` (the count, in the header too), ``null band``
      (one value per d_model), ``MAD``, ``q05``, ``share``, ``median``; ``layer``, ``flagged`` and ``min`` stay.
    """
    from rich.console import Console
    if "feature" in df.columns:
        return render_features(df, top=top, console=console)
    console = console or Console()
    prov = df.attrs.get("provenance", {})
    n_flagged = int(df["flagged"].sum()) if len(df) else 0
    title = (f"{name or prov.get('model', '?')} · {prov.get('model_type', '?')} · {prov.get('convention', '?')} "
             f"convention · {len(df):,} neurons · {n_flagged:,} flagged (cos ≤ {prov.get('threshold', '?')})")
    gated = bool(df["cos_gate_in"].notna().any()) if len(df) else False
    moe = bool(df["expert"].notna().any()) if len(df) else False
    names = ["rank", "layer"] + (["expert"] if moe else []) + ["neuron", "cos"] + \
        (["cos_gate_out", "cos_gate_in"] if gated else []) + ["z", "z_layer", "class"]
    records = df.head(top).to_dict(orient="records")
    short = {"cos_gate_out": "gate_out", "cos_gate_in": "gate_in"}
    columns = [Column(c, [_count(r[c]) if c in ("rank", "layer", "neuron")
                          else fmt_cell(r.get(c), 2 if c in ("z", "z_layer") else 3) for r in records],
                      justify="left" if c in ("class", "expert") else "right", short=short.get(c),
                      words=c == "class") for c in names]
    console.print(fit(console, columns, ["z", "cos_gate_in", "cos_gate_out", "z_layer", "rank", "class"],
                      styles=["bold red" if r["flagged"] else None for r in records],
                      hint="a wider terminal or --format csv shows every column", title=title, title_justify="left",
                      header_style="bold"))
    layers = df.attrs.get("layers", [])
    if layers:
        cells = {
            "layer": [str(s["layer"]) for s in layers],
            "neurons": [f"{s['n_neurons']:,}" for s in layers],
            "flagged": [f"{s['n_flagged']:,}" for s in layers],
            "share": [f"{100 * s['share_flagged']:.1f}%" for s in layers],
            "min": [fmt_cell(s["min"]) for s in layers], "q05": [fmt_cell(s["q05"]) for s in layers],
            "median": [fmt_cell(s["median"]) for s in layers], "MAD": [fmt_cell(s.get("mad")) for s in layers],
            "null band": [f"±{s['null_hi']:.3f}" for s in layers],
            "empirical": [f"{fmt_cell(s['emp_null_lo'])}…{fmt_cell(s['emp_null_hi'])}" for s in layers],
        }
        short = {"neurons": "n", "flagged": "flag", "null band": "null", "empirical": "emp"}
        drop = ["empirical", "neurons", "null band", "MAD", "q05", "share", "median"]
        title = ("Per layer (cos quantiles; MAD = median |cos - median|, z_layer's scale; null = 95% band of random "
                 "directions, empirical = mismatched neuron pairs")
        stats = any(s.get("n_stats") for s in layers)
        if stats:  # scan --activations: the corpus statistics' relation to cos (report.join)
            gate = any(s.get("spearman_gate_neg") == s.get("spearman_gate_neg") for s in layers)
            cells["firing"] = [_share(s.get("share_flagged_firing")) for s in layers]
            cells["ρ freq_pos"] = [_rho(s.get("spearman_freq_pos"), s.get("spearman_freq_pos_p")) for s in layers]
            if gate:
                cells["ρ neg gate"] = [_rho(s.get("spearman_gate_neg"), s.get("spearman_gate_neg_p")) for s in layers]
            drop = ["empirical", "neurons", "null band", "MAD", "q05", "firing", "share", "ρ freq_pos", "median"]
            title += ("; firing = flagged neurons with freq_pos > 0.5; ρ = Spearman of cos with freq_pos"
                      + (" and with the negative-gate share" if gate else "") + ", p-value in brackets")
        columns = [Column(c, v, short=short.get(c)) for c, v in cells.items()]
        console.print(fit(console, columns, drop, hint="a wider terminal or --format json shows every column",
                          title=title + ")", title_justify="left", header_style="bold"))


def render_features(df: Any, top: int = 20, console: Any = None) -> None:
    """A transcoder scan (``scan --transcoder``): the top ``top`` features, with their Neuronpedia links where the
    transcoder names its Neuronpedia id, and the per-layer summary (the model's own neurons and the skip path's
    copying score beside the features, where they were computed), fitted to the width as ``render``'s tables are:
    left out first, candidates: ``neuronpedia``, ``z``, ``z_layer``, ``rank``, ``class``; per layer: ``empirical``,
    ``features``, ``null band``, ``neurons min``, ``median``."""
    from rich.console import Console

    console = console or Console()
    prov = df.attrs.get("provenance", {})
    layers = df.attrs.get("layers", [])
    links = {s["layer"]: s.get("neuronpedia") for s in layers}
    n_flagged = int(df["flagged"].sum()) if len(df) else 0
    title = (f"{prov.get('options', {}).get('transcoder', '?')} on {prov.get('model', '?')} · "
             f"{prov.get('convention', '?')} convention · {len(df):,} features · {n_flagged:,} flagged "
             f"(cos ≤ {prov.get('threshold', '?')})")
    records = df.head(top).to_dict(orient="records")
    names = ["rank", "layer", "feature", "cos", "z", "z_layer", "class"]
    columns = [Column(c, [_count(r[c]) if c in ("rank", "layer", "feature")
                          else fmt_cell(r.get(c), 2 if c in ("z", "z_layer") else 3) for r in records],
                      justify="left" if c == "class" else "right", words=c == "class") for c in names]
    if any(links.values()):
        columns.append(Column("neuronpedia", [links[r["layer"]].format(feature=r["feature"])
                                              if links.get(r["layer"]) else "" for r in records], justify="left"))
    console.print(fit(console, columns, ["neuronpedia", "z", "z_layer", "rank", "class"],
                      styles=["bold red" if r["flagged"] else None for r in records],
                      hint="a wider terminal or --format csv shows every column", title=title, title_justify="left",
                      header_style="bold"))
    if not layers:
        return
    neurons = any(s.get("n_neurons") is not None for s in layers)
    skip = any(s.get("skip_copying") is not None for s in layers)
    cells = {
        "layer": [str(s["layer"]) for s in layers],
        "features": [f"{s['n_features']:,}" for s in layers],
        "flagged": [f"{s['n_flagged']:,}" for s in layers],
        "min": [fmt_cell(s["min"]) for s in layers], "median": [fmt_cell(s["median"]) for s in layers],
        "null band": [f"±{s['null_hi']:.3f}" for s in layers],
        "empirical": [f"{fmt_cell(s['emp_null_lo'])}…{fmt_cell(s['emp_null_hi'])}" for s in layers],
    }
    if neurons:
        cells["neurons flagged"] = ["" if s.get("n_neurons") is None else
                                    f"{s['neurons_flagged']:,} / {s['n_neurons']:,}" for s in layers]
        cells["neurons min"] = [fmt_cell(s.get("neurons_min")) for s in layers]
    if skip:
        cells["skip copying"] = [fmt_cell(s.get("skip_copying")) for s in layers]
    short = {"features": "n", "flagged": "flag", "null band": "null", "empirical": "emp",
             "neurons flagged": "n flag", "neurons min": "n min", "skip copying": "skip"}
    drop = ["empirical", "features", "null band"] + (["neurons min"] if neurons else []) + ["median"]
    console.print(fit(console, [Column(c, v, short=short.get(c)) for c, v in cells.items()], drop,
                      hint="a wider terminal or --format json shows every column",
                      title="Per layer (features' cos; null = 95% band of random directions, empirical = mismatched "
                            "feature pairs" + ("; neurons: the model's own MLP at that layer" if neurons else "")
                            + ("; skip: copying score of W_skip, as heads scores an OV circuit" if skip else "")
                            + ")", title_justify="left", header_style="bold"))


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
