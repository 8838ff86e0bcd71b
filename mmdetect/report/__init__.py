"""Results -> every output format, terminal tables, pages and plots. The only place that branches on format.

``formats``: files (csv tsv json jsonl parquet markdown, JSON documents, safe writing); ``tables``: terminal views
and ``emit``; ``page``/``trackpage``: the self-contained HTML pages; ``plot``/``trackplot``: figures; ``live``: the
sweep's display on stderr. The result types themselves live below, in ``mmdetect.results``.
"""
from __future__ import annotations

from mmdetect.report.formats import (
                                     EXTENSIONS,
                                     FILE_FORMATS,
                                     FLOAT_FORMAT,
                                     append_text,
                                     atomic_open,
                                     check_writable,
                                     clean,
                                     document,
                                     dumps,
                                     infer_format,
                                     metadata,
                                     read_metadata,
                                     write,
                                     write_document,
                                     write_text,
)
from mmdetect.report.tables import emit, fmt_cell, render, render_to

__all__ = ["EXTENSIONS", "FILE_FORMATS", "FLOAT_FORMAT", "append_text", "atomic_open", "check_writable", "clean",
           "document", "dumps", "emit", "fmt_cell", "infer_format", "metadata", "read_metadata", "render", "render_to",
           "write", "write_document", "write_text"]
