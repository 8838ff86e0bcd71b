"""``mmdetect report``: one self-contained HTML page of a model, a scan output, a sweep or a track (``commands.page``).

``cli.py`` registers ``report_command``; ``scan --format html`` calls ``scan_html`` with the scan's own options.
"""
from __future__ import annotations

from typing import Any

import click

from mmdetect.commands.page import TOP_K, TOP_ROWS
from mmdetect.options import debug_option, model_options, progress_option, text_options

# Options that only mean something when SOURCE is a model (a scan output, sweep or track folder is read as it is).
MODEL_ONLY = ("revision", "convention", "raw_alias", "threshold", "layers", "device", "top_k", "heads", "chains",
              "activations", "text", "dataset", "field_name", "max_tokens", "seq_len")
SCAN_LEAVES_OUT = ("left out by `mmdetect scan --format html`, which costs no more than the scan; "
                   "`mmdetect report MODEL -o page.html` adds it")
SCAN_NO_ACTIVATIONS = "mmdetect scan reads weights only: add --verify K for the activation evidence of the top K"


def _log(progress: bool | None) -> Any:
    return None if progress is False else (lambda message: click.echo(message, err=True))


def _written(output: str, size: int, summary: str) -> None:
    click.echo(f"wrote {output} ({size / 1e6:.2f} MB): {summary}", err=True)


@click.command(epilog="\b\nExample:\n"
                      "  mmdetect report ./stories260K -o stories.html\n"
                      "  mmdetect report gpt2 --convention raw --top-k 40 --no-chains -o gpt2-raw.html\n"
                      "  mmdetect report gpt2.csv --with heads.csv --with n2035.json -o gpt2.html\n"
                      "  mmdetect report sweep-out -o zoo.html          # a sweep's output folder\n"
                      "  mmdetect report pythia70m -o training.html     # a track's output folder")
@click.argument("source")
@model_options
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The HTML page to write (atomically). It opens offline: everything is inside it.")
@click.option("--top-k", type=click.IntRange(min=0), default=TOP_K, show_default=True,
              help="Explain the top K flagged neurons: their panels open from the table.")
@click.option("--rows", "top_rows", type=click.IntRange(min=0), default=TOP_ROWS, show_default=True,
              help="The table holds every flagged neuron plus the ROWS most negative others (the CSV has them all).")
@click.option("--heads/--no-heads", default=True, show_default=True,
              help="Score the attention heads (copying score of the OV circuit).")
@click.option("--chains/--no-chains", default=True, show_default=True, help="List writer -> deleter pairs.")
@click.option("--activations/--no-activations", default=None,
              help="Run the model on text for the panels' activation evidence (default: when transformers is "
                   "installed).")
@text_options
@click.option("--with", "extras", multiple=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Add a heads or chains output, or an explain JSON document, to the page (repeatable).")
@progress_option()
@debug_option
@click.pass_context
def report_command(ctx: click.Context, source: str, revision: str | None, convention: str, threshold: float,
                   layers: str | None, device: str, output: str, top_k: int, top_rows: int, heads: bool,
                   chains: bool, activations: bool | None, text: str | None, dataset: str | None, field_name: str,
                   max_tokens: int, seq_len: int, extras: tuple[str, ...], progress: bool | None) -> None:
    """Write one self-contained HTML page about SOURCE: charts per layer, a sortable neuron table, neuron panels,
    heads and chains.

    SOURCE is a model (checkpoint folder, hub id or .gguf: scanned with the options below), a scan output (csv, tsv,
    json, jsonl or parquet, with its provenance), a sweep output folder, or a track output folder.
    """
    from mmdetect.commands.page import build, detect, write
    from mmdetect.report import check_writable
    from mmdetect.scanner import parse_layers

    check_writable(output)
    parse_layers(layers)
    kind = detect(source)
    if kind != "model":
        ignored = MODEL_ONLY + (() if kind == "scan" else ("top_rows", "extras"))
        flags = {p.name: max(p.opts, key=len) for p in ctx.command.params}
        given = [flags[name] for name in ignored
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            click.echo(f"warning: {source} is a {kind} output, so {', '.join(given)} "
                       f"{'does' if len(given) == 1 else 'do'} nothing here", err=True)
    built = build(source, revision=revision, convention=convention, threshold=threshold,
                  layers=layers, device=device, progress=progress, top_k=top_k, top_rows=top_rows, heads=heads,
                  chains=chains, activations=activations, text=text, dataset=dataset, field_name=field_name,
                  max_tokens=max_tokens, seq_len=seq_len, extras=extras, log=_log(progress))
    _written(output, write(built, output), built.summary)


def scan_html(model: str, output: str | None, *, verify: int | None, **scan_options: Any) -> None:
    """``mmdetect scan MODEL --format html -o PAGE``: the report page of this scan. Like the scan itself it reads
    weights only (panels for the top 20 flagged neurons) unless --verify K asks for the activation evidence (of the
    top K); heads and chains are left to ``mmdetect report``."""
    from mmdetect.commands.page import model_page, write
    from mmdetect.errors import MMDetectError

    if output is None:
        raise MMDetectError("--format html writes a page: give -o PAGE.html")
    built = model_page(model, top_k=verify or TOP_K, activations=bool(verify), heads=False, chains=False,
                       leave_out=SCAN_LEAVES_OUT, no_activations=SCAN_NO_ACTIVATIONS, **scan_options)
    _written(output, write(built, output), built.summary)
