"""Rows -> every output format, terminal tables, plots and progress. The only place that branches on format."""
from __future__ import annotations

from mmdetect.report.formats import (EXTENSIONS, FILE_FORMATS, FLOAT_FORMAT, atomic_open, check_writable, clean,
                                     fmt_cell, infer_format, metadata, read_metadata, render, write)

__all__ = ["EXTENSIONS", "FILE_FORMATS", "FLOAT_FORMAT", "atomic_open", "check_writable", "clean", "fmt_cell",
           "infer_format", "metadata", "read_metadata", "render", "write"]
