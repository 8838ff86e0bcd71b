"""A progress bar on stderr: stdout stays free for the rows."""
from __future__ import annotations

import sys
from typing import Any, Callable


class progress:
    """A rich progress bar on stderr when it is a terminal (or when forced); otherwise silent."""

    def __init__(self, enabled: bool | None, total: int, label: str, verb: str = "scanning",
                 unit: str | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total, self.label, self.verb, self.unit = total, label, verb, unit
        self.bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn()]
        if self.unit:  # a rate and the time left (the corpus pass: tokens, tokens/s)
            from rich.progress import TimeRemainingColumn

            columns.insert(3, TextColumn(self.unit))
            columns += [TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
        self.bar = Progress(*columns, console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(f"{self.verb} {self.label}", total=self.total, rate="")
        if self.unit:
            return lambda n: self.bar.update(task, advance=n, rate=f"{self.bar.tasks[0].speed or 0:,.0f} "
                                                                    f"{self.unit}/s")
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
