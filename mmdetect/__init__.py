"""mmdetect: find memory-management neurons in transformer language models, streamed from disk.

    >>> import mmdetect
    >>> df = mmdetect.scan("path/to/checkpoint")          # a pandas DataFrame, one row per MLP neuron
    >>> df[df.flagged].head()
    >>> df.attrs["provenance"]

Heavy imports (torch, pandas) happen on first use, so ``mmdetect --help`` stays fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["scan", "scan_transcoder", "MMDetectError", "__version__"]

from mmdetect.errors import MMDetectError
from mmdetect.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    # Type checkers see the scanner's full (overloaded) signature; at run time a thin wrapper defers the heavy imports.
    from mmdetect.analysis.features import scan_transcoder as scan_transcoder
    from mmdetect.scanner import scan as scan
else:
    def scan(model: str, **options: Any) -> Any:
        """Scan every MLP neuron of ``model`` (a local folder, a hub id or a .gguf file); see
        ``mmdetect.scanner.scan``."""
        from mmdetect.scanner import scan as _scan

        return _scan(model, **options)

    def scan_transcoder(model: str, transcoder: Any, **options: Any) -> Any:
        """Scan every feature of a SAELens transcoder (folder, or folder of per-layer folders) against ``model``;
        see ``mmdetect.analysis.features.scan_transcoder``."""
        from mmdetect.analysis.features import scan_transcoder as _scan_transcoder

        return _scan_transcoder(model, transcoder, **options)
