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


if __name__ == "__main__":  # pragma: no cover
    main()
