"""Rows -> every output format, terminal tables, plots and progress. The only place that branches on format.

``formats``: files (csv tsv json jsonl parquet markdown, JSON documents, safe writing); ``tables``: terminal views
and ``emit``; ``rows``: the scan's numpy rows (``ScanResult``); ``provenance``: one schema for every output;
``plot``: figures; ``progress`` and ``live``: what goes to stderr while a scan or a sweep runs.
"""
from __future__ import annotations

from mmdetect.report.formats import (EXTENSIONS, FILE_FORMATS, FLOAT_FORMAT, append_text, atomic_open,
                                     check_writable, clean, document, dumps, infer_format, metadata, read_metadata,
                                     write, write_document, write_text)
from mmdetect.report.provenance import Provenance
from mmdetect.report.rows import COLUMNS, ScanResult, flagged_rows
from mmdetect.report.tables import emit, fmt_cell, render, render_to

__all__ = ["COLUMNS", "EXTENSIONS", "FILE_FORMATS", "FLOAT_FORMAT", "Provenance", "ScanResult", "append_text",
           "atomic_open", "check_writable", "clean", "document", "dumps", "emit", "flagged_rows", "fmt_cell",
           "infer_format", "metadata", "read_metadata", "render", "render_to", "write", "write_document",
           "write_text"]
