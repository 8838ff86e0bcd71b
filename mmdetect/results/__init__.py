"""What every command produces, below everything that computes or writes it: the scan's rows (``ScanResult``), one
provenance schema (``Provenance``) and the progress bar on stderr. numpy and the standard library only."""
from __future__ import annotations

from mmdetect.results.progress import progress
from mmdetect.results.provenance import Provenance
from mmdetect.results.rows import COLUMNS, ScanResult, flagged_rows, is_flagged

__all__ = ["COLUMNS", "Provenance", "ScanResult", "flagged_rows", "is_flagged", "progress"]
