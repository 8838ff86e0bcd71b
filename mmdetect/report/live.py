"""A sweep's progress on stderr: one line per model, live on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
from typing import Any, Callable

ICONS = {"ok": "[green]✓[/]", "drift": "[yellow]![/]", "failed": "[red]✗[/]"}


class SweepProgress:
    """``items``: (name, model) per model, in sweep order. ``enabled`` None: live only when stderr is a terminal."""

    def __init__(self, items: list[tuple[str, str]], enabled: bool | None) -> None:
        self.items = items
        self.order = {name: k for k, (name, _) in enumerate(items)}
        self.live = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> SweepProgress:
        if self.live and self.items:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            width = max(len(name) for name, _ in self.items)
            self.bar = Progress(SpinnerColumn(finished_text=" "), TextColumn("{task.fields[icon]}"),
                                TextColumn(f"[bold]{{task.description:<{width}}}"),
                                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                console=Console(stderr=True), transient=False)
            self.bar.start()
            from rich.markup import escape

            for name, model in self.items:
                self.tasks[name] = self.bar.add_task(name, total=1, start=False, icon=" ",
                                                     detail=f"[dim]queued · {escape(model)}[/]")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _log(self, name: str, text: str) -> None:
        print(f"[{self.order[name] + 1}/{len(self.items)}] {name}: {text}", file=sys.stderr, flush=True)

    def start(self, name: str, text: str) -> None:
        """The model is being checked or scanned: ``text`` says which (e.g. "scanning ./m")."""
        if self.bar is not None:
            from rich.markup import escape

            self.bar.start_task(self.tasks[name])
            self.bar.update(self.tasks[name], detail=escape(text))
        else:
            self._log(name, text)

    def layer(self, name: str, text: str) -> Callable[[int], None]:
        """A callback for each layer scanned (live display only)."""
        if self.bar is None:
            return lambda layer: None
        from rich.markup import escape

        task = self.tasks[name]
        return lambda layer: self.bar.update(task, detail=escape(f"{text} · layer {layer}"))

    def finish(self, name: str, status: str, detail: str, seconds: float) -> None:
        if self.bar is not None:
            from rich.markup import escape

            self.bar.update(self.tasks[name], completed=1, icon=ICONS[status], detail=escape(detail))
            self.bar.stop_task(self.tasks[name])
        else:
            self._log(name, f"{detail} ({seconds:.1f} s)")
