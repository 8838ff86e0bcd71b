"""The command line: parse options, call the library, hand the rows to ``report``. No logic lives here."""
from __future__ import annotations

import sys
from typing import Any

import click

from mmdetect import __version__
from mmdetect.errors import MMDetectError
from mmdetect.options import debug_option, model_options, output_options, resolve_output


def _example(*lines: str) -> str:
    """A help epilog: click prints it after the options and commands, so every help ends with its examples."""
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in lines)


class Group(click.Group):
    """Turns user errors into one line on stderr and exit code 2; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MMDetectError as exc:
            if ctx.meta.get("mmdetect.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:
            if ctx.meta.get("mmdetect.debug"):
                raise
            click.echo(f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback "
                       f"and please report it", err=True)
            ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             epilog=_example("mmdetect scan ./my-checkpoint", "mmdetect scan gpt2 --format csv -o gpt2.csv"))
@click.version_option(__version__, prog_name="mmdetect")
@debug_option
def main() -> None:
    """Find memory-management neurons: MLP neurons whose input and output weights point in opposite directions."""


@main.command(epilog=_example("mmdetect scan ./TinyLlama --top 30",
                              "mmdetect scan gpt2 --layers 0-5 --format csv -o gpt2.csv",
                              "mmdetect scan model.gguf --raw --format parquet -o raw.parquet"))
@click.argument("model")
@model_options
@output_options
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a terminal).")
@debug_option
def scan(model: str, revision: str | None, raw: bool, threshold: float, layers: str | None, device: str,
         fmt: str | None, output: str | None, top: int, flagged_only: bool, progress: bool | None) -> None:
    """Scan every MLP neuron of MODEL and rank them by cos(read, write).

    MODEL is a local checkpoint folder, a hub id (cached files are used, HF_HUB_OFFLINE=1 works) or a .gguf file.
    """
    from mmdetect import report
    from mmdetect.scanner import parse_layers, scan as run_scan

    parse_layers(layers)  # reject a bad --layers before opening anything
    fmt, output = resolve_output(fmt, output)
    df = run_scan(model, revision=revision, threshold=threshold, raw=raw, layers=layers, device=device,
                  progress=progress)
    rows = df[df["flagged"]].reset_index(drop=True) if flagged_only else df
    rows.attrs = df.attrs
    if fmt == "table":
        if output:
            with report.atomic_open(output) as fh:
                from rich.console import Console

                report.render(rows, top=top, console=Console(file=fh, width=140))
        else:
            report.render(rows, top=top)
        return
    report.write(rows, fmt, output)
    if output:
        click.echo(f"wrote {len(rows):,} rows to {output}", err=True)


@main.command(epilog=_example("mmdetect archs", "mmdetect archs --gguf --format csv"))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--gguf", is_flag=True, help="List GGUF architectures instead of Hugging Face model types.")
@debug_option
def archs(fmt: str, gguf: bool) -> None:
    """List the model types the registry supports, with their MLP layout."""
    from mmdetect.architectures import load_registry

    registry = load_registry()
    want = "gguf" if gguf else "safetensors"
    rows = []
    for fam in registry.families:
        if fam.format != want:
            continue
        for model_type in fam.model_types:
            for spec in fam.mlps:
                rows.append({
                    "model_type": model_type, "family": fam.family, "mlp": spec.name,
                    "gated": spec.gated, "experts": spec.experts,
                    "tensors": ", ".join(f"{role}={ts.key.split('{i}.')[-1]}" for role, ts in spec.tensors().items()),
                    "pre_norm": spec.pre_norm.kind if spec.pre_norm else "none",
                    "post_norm": spec.post_norm.kind if spec.post_norm else "",
                    "variants": len(fam.variants),
                })
    rows.sort(key=lambda r: (r["model_type"], r["mlp"]))
    if fmt == "json":
        import json

        click.echo(json.dumps({"supported": rows, "unsupported": registry.refused}, indent=1))
    elif fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        types = sorted({r["model_type"] for r in rows})
        table = Table(title=f"{len(types)} supported {'GGUF architectures' if gguf else 'model types'}",
                      title_justify="left", header_style="bold")
        for col in ("model_type", "mlp", "gated", "experts", "pre_norm", "post_norm", "tensors"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["model_type"], r["mlp"], "yes" if r["gated"] else "", r["experts"], r["pre_norm"],
                          r["post_norm"], r["tensors"])
        console = Console()
        console.print(table)
        if not gguf and registry.refused:
            console.print("[bold]Known but unsupported:[/bold] " + "; ".join(
                f"{k} ({v})" for k, v in sorted(registry.refused.items())))


@main.command(epilog=_example("mmdetect sweep configs/examples/tiny-local.yaml --output-dir sweep-out",
                              "mmdetect sweep configs/hub-small.yaml -d out/shard0 --shard 0/4",
                              "mmdetect sweep configs/published.yaml -d out --only 'gpt2-*' --baseline last-run"))
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("-d", "--output-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for <name>.csv per model, summary.csv/.md, results.json and the figures.")
@click.option("--shard", default=None, metavar="I/N", help="Scan only entries whose config index is I modulo N.")
@click.option("--only", multiple=True, metavar="GLOB", help="Only entries whose name matches (repeatable).")
@click.option("--force", is_flag=True, help="Rescan models whose output is complete and unchanged.")
@click.option("--baseline", type=click.Path(exists=True, file_okay=False), default=None, metavar="OLD_DIR",
              help="Compare per-layer flagged shares with an earlier sweep's output folder.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="How far a layer's flagged share may move from --baseline before it counts as drift.")
@click.option("--threshold", type=float, default=None, help="Override every entry's threshold.")
@click.option("--raw/--folded", "raw", default=None, help="Override every entry's convention.")
@click.option("--layers", default=None, metavar="SPEC", help="Override every entry's layers, e.g. 0-5,10.")
@click.option("--device", default=None, metavar="DEV", help="Override every entry's device (cpu, cuda, mps).")
@click.option("--format", "fmt", type=click.Choice(["csv", "tsv", "json", "jsonl", "parquet"]), default=None,
              help="Override every entry's per-model file format.")
@click.option("--plots/--no-plots", default=True, help="Draw <name>.png and overview.png (default: on).")
@click.option("--progress/--no-progress", default=None, help="Live display (default: when stderr is a terminal).")
@debug_option
@click.pass_context
def sweep(ctx: click.Context, config: str, output_dir: str, shard: str | None, only: tuple[str, ...], force: bool,
          baseline: str | None, tolerance: float, threshold: float | None, raw: bool | None, layers: str | None,
          device: str | None, fmt: str | None, plots: bool, progress: bool | None) -> None:
    """Scan every model of a zoo CONFIG (YAML) and write per-model results, a summary and regression gates.

    Options come from the command line, then the entry, then the config's defaults. Relative model paths resolve
    against the config file's folder. A rerun skips models whose output is complete and unchanged. Exit code: 0 ok,
    1 a model failed, 3 drift from an expect: gate or --baseline, 2 a config error (nothing scanned).
    """
    from mmdetect import sweep as zoo

    parsed = zoo.parse_shard(shard)
    spec = zoo.load_config(config, {"threshold": threshold, "raw": raw, "layers": layers, "device": device,
                                    "format": fmt})
    result = zoo.run_sweep(spec, output_dir, shard=parsed, only=only, force=force, baseline=baseline,
                           tolerance=tolerance, plots=plots, progress=progress,
                           debug=bool(ctx.find_root().meta.get("mmdetect.debug")))
    click.echo(f"{' · '.join(f'{v} {k}' for k, v in result.counts.items() if v)} · wrote {output_dir}/summary.csv, "
               f"summary.md, results.json" + (", overview.png" if plots else ""), err=True)
    ctx.exit(result.exit_code)


@main.command(epilog=_example("mmdetect merge out/shard0 out/shard1 out/shard2 out/shard3 --output-dir out/all",
                              "mmdetect merge shards/* -d merged --baseline last-run"))
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-d", "--output-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the merged per-model files and reports.")
@click.option("--baseline", type=click.Path(exists=True, file_okay=False), default=None, metavar="OLD_DIR",
              help="Compare per-layer flagged shares with an earlier sweep's output folder.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="How far a layer's flagged share may move from --baseline before it counts as drift.")
@click.option("--plots/--no-plots", default=True, help="Draw overview.png (default: on).")
@debug_option
@click.pass_context
def merge(ctx: click.Context, folders: tuple[str, ...], output_dir: str, baseline: str | None, tolerance: float,
          plots: bool) -> None:
    """Combine the output folders of `mmdetect sweep --shard` runs into one, as if swept unsharded.

    Models are listed in config order; one that no folder has is reported as failed. Exit codes as for sweep.
    """
    from mmdetect import sweep as zoo

    result = zoo.merge(list(folders), output_dir, baseline=baseline, tolerance=tolerance, plots=plots)
    click.echo(f"merged {len(folders)} folders: {' · '.join(f'{v} {k}' for k, v in result.counts.items() if v)} "
               f"· wrote {output_dir}/summary.csv", err=True)
    ctx.exit(result.exit_code)


@main.command(epilog=_example("mmdetect plot gpt2.csv", "mmdetect plot scan.csv --d-model 768 -o figure.png",
                              "mmdetect plot sweep-out            # the overview of a sweep"))
@click.argument("scan_file", type=click.Path(exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="PNG to write. Default: SCAN_FILE with .png (overview.png for a sweep folder).")
@click.option("--d-model", type=click.IntRange(min=2), default=None,
              help="Residual width for the random-direction band when no sibling .json/.parquet/.meta.json has it.")
@click.option("--threshold", type=float, default=None, help="Threshold line (default: the scan's).")
@click.option("--title", default=None, help="Figure title (default: the model).")
@debug_option
def plot(scan_file: str, output: str | None, d_model: int | None, threshold: float | None,
         title: str | None) -> None:
    """Draw the cos distribution per layer of a scan output (csv, tsv, json, jsonl, parquet) as a PNG.

    Given a sweep output folder, draw its overview: flagged share against relative depth, one line per model.
    """
    from mmdetect.plot import plot_file

    png, note = plot_file(scan_file, output, d_model=d_model, threshold=threshold, title=title)
    if note:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {png}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
