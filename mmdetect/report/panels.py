"""Terminal views of explain, scan --verify, heads and chains: their results as rich panels and tables.

Each renderer takes what the analysis returned (explain's JSON-ready dict, or a DataFrame with its attrs) and draws
it on a rich console; nothing here computes.
"""
from __future__ import annotations

import math
from typing import Any

from mmdetect.report.tables import Column, fit, fmt_cell

ERASES = 0.5  # deletion score from which a verified row is highlighted as erasing in practice


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:+.{digits}f}" if isinstance(v, float) else str(v)


def _spark(counts: list[int]) -> str:
    bars = " ▁▂▃▄▅▆▇█"
    top = max(counts) if counts else 0
    return "".join(bars[0 if c == 0 else max(1, round(8 * math.sqrt(c / top)))] for c in counts) if top else ""


def render_explain(doc: dict[str, Any], console: Any = None, name: str | None = None) -> None:
    """The explain report as rich panels and tables. name: the model's, for the header (default: the provenance's
    model reference)."""
    from rich.console import Console, Group
    from rich.panel import Panel

    console = console or Console()
    kind = "feature" if "feature" in doc else "neuron"   # a transcoder feature (explain --transcoder) or a neuron
    parts: list[Any] = [_target_text(doc, kind, name), _writers_table(doc["writers"])]
    if doc.get("vocab"):
        parts.append(_vocab_table(doc["vocab"]))
    parts += _activation_parts(doc.get("activations") or {}, kind)
    console.print(Panel(Group(*parts), title="mmdetect explain", title_align="left"))


def _target_text(doc: dict[str, Any], kind: str, name: str | None) -> Any:
    """Which neuron or feature, its cosines and class, its transcoder, and the attention gap when there is one."""
    from rich.markup import escape
    from rich.text import Text

    prov, nrn = doc["provenance"], doc[kind]
    where = f"layer {nrn['layer']}" + (f" expert {nrn['expert']}" if nrn.get("expert") is not None else "") + \
        f" {kind} {nrn[kind]}"
    lines = [f"[bold]{escape(where)}[/bold] of {escape(str(name or prov['model']))} ({prov['model_type']}, "
             f"{prov['convention']} convention, d_model {nrn['d_model']})",
             f"cos(read, write) = [bold]{nrn['cos']:+.3f}[/bold]  z = {nrn['z']:+.1f}  class: {nrn['class'] or '-'}"
             + (f"  cos(gate, out) = {nrn['cos_gate_out']:+.3f}  cos(gate, in) = {nrn['cos_gate_in']:+.3f}"
                if "cos_gate_out" in nrn else "")
             + f"  (random directions: ±{nrn['null_band'][1]:.3f})"]
    if kind == "feature":
        lines.append(f"transcoder {escape(str(nrn['transcoder']))} ({nrn['architecture']}, {nrn['d_sae']:,} features): "
                     f"reads {escape(nrn['hook_name'])} ({nrn['reads']}), writes {escape(nrn['hook_name_out'])} "
                     f"({nrn['writes']})" + (f"\n{escape(nrn['neuronpedia'])}" if nrn.get("neuronpedia") else ""))
    if prov.get("attention_gap"):
        lines.append(f"[yellow]{escape(prov['attention_gap'])}[/yellow]")
    return Text.from_markup("\n".join(lines))


def _writers_table(wr: dict[str, Any]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Upstream writers of what it reads", title_justify="left", header_style="bold",
                  caption=f"score: |cos(write, r̂)| (random directions: < {wr['null_band'][1]:.3f}); heads: share of "
                          f"output energy along r̂", caption_justify="left")
    for col in ("#", "writer", "kind", "score", "cos / subspace"):
        table.add_column(col, justify="right" if col in ("#", "score", "cos / subspace") else "left")
    for n, e in enumerate(wr["top"], 1):
        extra = _num(e.get("cos")) if e["kind"] != "head" else f"{e['subspace']:.3f}"
        table.add_row(str(n), escape(e["label"]), e["kind"], f"{e['score']:.3f}", extra)
    return table


def _vocab_table(voc: dict[str, Any]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    vt = Table(title="Vocabulary view (unembedding with the final norm's gain)", title_justify="left",
               header_style="bold")
    for col in ("reads (cos)", "promotes (logit)", "suppresses (logit)"):
        vt.add_column(col)
    for a, b, c in zip(voc["reads"], voc["promotes"], voc["suppresses"]):
        vt.add_row(f"{escape(repr(a['token']))} {a['cos']:+.3f}", f"{escape(repr(b['token']))} {b['logit']:+.3g}",
                   f"{escape(repr(c['token']))} {c['logit']:+.3g}")
    return vt


def _activation_parts(act: dict[str, Any], kind: str = "neuron") -> list[Any]:
    """The activation evidence: distribution, deletion score and the top-activating contexts (or why it was
    skipped)."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    if "skipped" in act:
        return [Text(f"Activation evidence: skipped ({act['skipped']})", style="yellow")]
    if not act:
        return []
    dist, dele = act["distribution"], act["deletion"]
    q = dist["quantiles"]
    head = (f"[bold]Activation evidence[/bold] on {escape(act['source'])}: {dist['tokens']:,} tokens · "
            f"mean {dist['mean']:+.3g} · median {q['q50']:+.3g} · q99 {q['q99']:+.3g} · max {dist['max']:+.3g} · "
            f"min {dist['min']:+.3g}\n  histogram {dist['histogram']['edges'][0]:+.3g} "
            f"{_spark(dist['histogram']['counts'])} {dist['histogram']['edges'][-1]:+.3g}\n"
            f"[bold]Deletion score {_num(dele['score'])}[/bold] over the {dele['tokens']} tokens where |a| is "
            f"largest: the {kind}'s own write removes that fraction of the residual's component along r̂ "
            f"(median per token {_num(dele.get('median_fraction'))})")
    ct = Table(title="Top-activating contexts" + (" (text shown as the UTF-8 bytes it was fed as)"
                                                  if act.get("tokens") == "bytes" else ""),
               title_justify="left", header_style="bold")
    for col in ("act", "removed", "context"):
        ct.add_column(col, justify="right" if col != "context" else "left")
    for c in act["contexts"]:
        text = Text()
        text.append(c["before"].replace("\n", "⏎"))
        text.append(c["token"].replace("\n", "⏎"), style="bold reverse")
        text.append(c["after"].replace("\n", "⏎"))
        ct.add_row(f"{c['activation']:+.3g}", _num(c["fraction_removed"], 2), text)
    return [Text.from_markup(head), ct]


def render_verify(df: Any, console: Any = None, top: int = 20) -> None:
    """The verified rows of a scan (after ``verify``) as a table."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    rows = df[df["top_writer"].notna() | df["deletion"].notna()].head(top)
    info = df.attrs.get("provenance", {}).get("options", {}).get("verify", {})
    table = Table(title=f"Verified: the top {info.get('verified', len(rows))} flagged neurons", title_justify="left",
                  header_style="bold", caption_justify="left",
                  caption=f"deletion: fraction of the residual's component along r̂ that the neuron's write removes "
                          f"where it fires most (bold: ≥ {ERASES}), on {info.get('corpus', 'no text')}")
    moe = bool(df["expert"].notna().any())
    cols = ["rank", "layer"] + (["expert"] if moe else []) + ["neuron", "cos", "deletion", "top_writer",
                                                              "writer_score"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("top_writer", "expert") else "right")
    for row in rows.to_dict(orient="records"):
        style = "bold red" if isinstance(row["deletion"], float) and row["deletion"] >= ERASES else None
        table.add_row(*[escape(_num(row[c])) if isinstance(row[c], float) else escape(str(row[c] if row[c] is not None
                                                                                          else ""))
                        for c in cols], style=style)
    console.print(table)


def render_heads(df: Any, top: int = 20, console: Any = None, name: str | None = None) -> None:
    """The top ``top`` heads and the per-layer summary as rich tables, fitted to the console's width as the scan's
    are (``tables.fit``: no number is cut). name: the model's, for the header (default: the provenance's model
    reference).

    At narrow widths ``kv_head`` -> ``kv``, ``min_eig_rel`` -> ``min_eig``, ``kv heads`` -> ``kv``, ``flagged`` ->
    ``flag``; then columns go, the least important first: heads ``kv_head``, ``ov_norm``, ``min_eig_rel``,
    ``neg_mass``, ``rank`` (``layer``, ``head`` and ``copying`` stay); per layer ``d_head``, ``kv heads``,
    ``heads``, ``median``, ``null band`` (``layer``, ``flagged`` and ``min`` stay).
    """
    from rich.console import Console

    console = console or Console()
    prov = df.attrs.get("provenance", {})
    n_flagged = int(df["flagged"].sum()) if len(df) else 0
    records = df.head(top).to_dict(orient="records")
    names = ["rank", "layer", "head", "kv_head", "copying", "neg_mass", "min_eig_rel", "ov_norm"]
    short = {"kv_head": "kv", "min_eig_rel": "min_eig"}
    columns = [Column(c, [str(r[c]) if c in ("rank", "layer", "head", "kv_head") else
                          (f"{r[c]:.3g}" if c == "ov_norm" and r[c] == r[c] else fmt_cell(r[c])) for r in records],
                      short=short.get(c)) for c in names]
    console.print(fit(console, columns, ["kv_head", "ov_norm", "min_eig_rel", "neg_mass", "rank"],
                      styles=["bold red" if r["flagged"] else None for r in records],
                      hint="a wider terminal or --format csv shows every column",
                      title=f"{name or prov.get('model', '?')} · {prov.get('model_type', '?')} · "
                            f"{prov.get('convention', '?')} convention · {len(df):,} heads · {n_flagged:,} flagged "
                            f"(copying ≤ {prov.get('threshold', '?')})", title_justify="left", header_style="bold"))
    layers = df.attrs.get("layers", [])
    if layers:
        cells = {"layer": [str(s["layer"]) for s in layers], "heads": [str(s["n_heads"]) for s in layers],
                 "kv heads": [str(s["n_kv_heads"]) for s in layers], "d_head": [str(s["d_head"]) for s in layers],
                 "flagged": [str(s["n_flagged"]) for s in layers], "min": [fmt_cell(s["min"]) for s in layers],
                 "median": [fmt_cell(s["median"]) for s in layers],
                 "null band": [f"{fmt_cell(s['null_lo'])}…{fmt_cell(s['null_hi'])}" for s in layers]}
        short = {"kv heads": "kv", "flagged": "flag"}
        columns = [Column(c, v, short=short.get(c)) for c, v in cells.items()]
        console.print(fit(console, columns, ["d_head", "kv heads", "heads", "median", "null band"],
                          hint="a wider terminal or --format json shows every column",
                          title="Per layer (copying = Σ Re λ / Σ |λ| of W_V·W_O; null = 95% band of random heads)",
                          title_justify="left", header_style="bold"))


def render_chains(df: Any, top: int = 20, console: Any = None, name: str | None = None) -> None:
    """The top ``top`` writer -> deleter pairs as a rich table. name: the model's, for the header (default: the
    provenance's model reference)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    prov = df.attrs.get("provenance", {})
    dl = df.attrs.get("deleters", {})
    table = Table(title=f"{name or prov.get('model', '?')} · writer → deleter chains", title_justify="left",
                  header_style="bold", caption_justify="left",
                  caption=f"{dl.get('neurons_used', 0)} neuron deleters (cos ≤ {prov.get('threshold')}) and "
                          f"{dl.get('heads_used', 0)} head deleters (copying ≤ {prov.get('head_threshold')}); "
                          f"score = align × erase")
    for col in ("rank", "writer", "→ deleter", "align", "erase", "score"):
        table.add_column(col, justify="left" if col in ("writer", "→ deleter") else "right")
    for row in df.head(top).to_dict(orient="records"):
        table.add_row(str(row["rank"]), escape(str(row["writer"])), escape(str(row["deleter"])),
                      f"{row['align']:.3f}", f"{row['erase']:+.3f}", f"{row['score']:+.3f}")
    console.print(table)
    if not len(df):
        console.print("No flagged deleters: lower --threshold / --head-threshold to look further.")
