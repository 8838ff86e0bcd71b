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
              "no_activations", "text", "dataset", "field_name", "max_tokens", "seq_len", "transcoder")
EVIDENCE = "\x00evidence"   # --activations with no value: run the model for the panels' activation evidence
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
                      "  mmdetect activations gpt2 -o gpt2-stats.csv\n"
                      "  mmdetect report gpt2 --activations gpt2-stats.csv -o gpt2.html\n"
                      "  mmdetect report gpt2 --activations auto --format neuronpedia -o gpt2-np/\n"
                      "  mmdetect report gpt2.csv --with heads.csv --with n2035.json -o gpt2.html\n"
                      "  mmdetect report gpt2 --transcoder ./gpt2-transcoders -o gpt2-tc.html\n"
                      "  mmdetect report sweep-out -o zoo.html          # a sweep's output folder\n"
                      "  mmdetect report pythia70m -o training.html     # a track's output folder")
@click.argument("source")
@model_options
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The HTML page to write (atomically; it opens offline: everything is inside it), or with "
                   "--format neuronpedia the folder of upload batches.")
@click.option("--format", "fmt", type=click.Choice(["html", "neuronpedia"]), default="html", show_default=True,
              help="html: the report page. neuronpedia: the explained neurons as Neuronpedia feature batches "
                   "(the body of its /api/feature/upload-batch), one source per layer; needs --activations.")
@click.option("--neuronpedia-model", "np_model", default=None, metavar="ID",
              help="--format neuronpedia: the Neuronpedia model id (default: the model's name, lowercased).")
@click.option("--neuronpedia-source-set", "np_source_set", default="mmdetect-mlp", show_default=True,
              metavar="NAME", help="--format neuronpedia: the source set; each layer L is source L-NAME.")
@click.option("--top-k", type=click.IntRange(min=0), default=TOP_K, show_default=True,
              help="Explain the top K flagged neurons: their panels open from the table.")
@click.option("--rows", "top_rows", type=click.IntRange(min=0), default=TOP_ROWS, show_default=True,
              help="The table holds every flagged neuron plus the ROWS most negative others (the CSV has them all).")
@click.option("--heads/--no-heads", default=True, show_default=True,
              help="Score the attention heads (copying score of the OV circuit).")
@click.option("--chains/--no-chains", default=True, show_default=True, help="List writer -> deleter pairs.")
@click.option("--activations", "stats", is_flag=False, flag_value=EVIDENCE, default=None, metavar="[STATS|auto]",
              help="STATS: an `mmdetect activations` output (OUT, with OUT.details.parquet beside it) of this model "
                   "and convention, joined on: the table gains freq_pos (and freq_gn for gated MLPs), each panel its "
                   "sign cases, histogram and top contexts, and the page a figure of cos against them. auto: run "
                   "that corpus pass now, with its defaults. With no value: run the model on text for the panels' "
                   "activation evidence (the default when transformers is installed and no STATS is given).")
@click.option("--no-activations", "no_activations", is_flag=True, default=False,
              help="Do not run the model for the panels' activation evidence.")
@text_options
@click.option("--transcoder", default=None, metavar="PATH",
              help="A model as SOURCE: the page of this SAELens transcoder's features (as scan --transcoder "
                   "--neurons scans them) in place of the model's neurons, the top K flagged explained as explain "
                   "--transcoder explains one.")
@click.option("--with", "extras", multiple=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Add a heads or chains output, or an explain JSON document, to the page (repeatable).")
@progress_option()
@debug_option
@click.pass_context
def report_command(ctx: click.Context, source: str, revision: str | None, convention: str, threshold: float,
                   layers: str | None, device: str, output: str, fmt: str, np_model: str | None,
                   np_source_set: str, top_k: int, top_rows: int, heads: bool, chains: bool, stats: str | None,
                   no_activations: bool, text: str | None, dataset: str | None, field_name: str,
                   max_tokens: int, seq_len: int, transcoder: str | None, extras: tuple[str, ...],
                   progress: bool | None) -> None:
    """Write one self-contained HTML page about SOURCE: charts per layer, a sortable neuron table, neuron panels,
    heads and chains.

    SOURCE is a model (checkpoint folder, hub id or .gguf: scanned with the options below), a scan output (csv, tsv,
    json, jsonl or parquet, with its provenance), a sweep output folder, or a track output folder. A transcoder scan
    (scan --transcoder), or a model with --transcoder PATH, gets the same page with one row per feature.
    """
    from mmdetect.commands.page import build, detect, write
    from mmdetect.errors import UsageError
    from mmdetect.report import check_writable
    from mmdetect.scanner import parse_layers

    if no_activations and stats == EVIDENCE:
        raise UsageError("--activations and --no-activations contradict each other: give one")
    activations = False if no_activations else True if stats == EVIDENCE else None
    stats = None if stats == EVIDENCE else stats
    parse_layers(layers)
    kind = detect(source)
    if fmt == "neuronpedia":
        from mmdetect.commands.page import neuronpedia_export

        if transcoder is not None:
            raise UsageError("--format neuronpedia exports the model's neurons, not a transcoder's features: leave "
                             "--transcoder out, or write the html page")
        if kind != "model":
            raise UsageError(f"--format neuronpedia needs a model as SOURCE ({source} is a {kind} output): it reads "
                             f"the vocabulary view from the weights")
        if not stats:
            raise UsageError("--format neuronpedia needs --activations STATS (or auto): a Neuronpedia feature "
                             "carries its top activations")
        written = neuronpedia_export(source, output, stats=stats, revision=revision, convention=convention,
                                     threshold=threshold, layers=layers, device=device, progress=progress,
                                     top_k=top_k, model_id=np_model, source_set=np_source_set, text=text,
                                     dataset=dataset, field_name=field_name, log=_log(progress))
        click.echo(f"wrote {len(written)} Neuronpedia batch file{'' if len(written) == 1 else 's'} to {output}",
                   err=True)
        return
    check_writable(output)
    if kind != "model":
        ignored = MODEL_ONLY + (() if kind == "scan" else ("top_rows", "extras", "stats"))
        flags = {p.name: max(p.opts, key=len) for p in ctx.command.params}
        given = [flags[name] for name in ignored
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            click.echo(f"warning: {source} is a {kind} output, so {', '.join(given)} "
                       f"{'does' if len(given) == 1 else 'do'} nothing here", err=True)
    built = build(source, revision=revision, convention=convention, threshold=threshold,
                  layers=layers, device=device, progress=progress, top_k=top_k, top_rows=top_rows, heads=heads,
                  chains=chains, activations=activations, text=text, dataset=dataset, field_name=field_name,
                  max_tokens=max_tokens, seq_len=seq_len, extras=extras, log=_log(progress), stats=stats,
                  transcoder=transcoder)
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
