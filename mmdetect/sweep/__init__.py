"""Zoo sweeps: a YAML config of models -> one scan per model -> summary, regression gates, plots; and merge.

``config`` reads and validates a zoo; ``run`` sweeps it (shards, resume, the folder lock; ``run_units``, the
runner that ``mmdetect track`` shares); ``gates`` compares shares
with ``expect:`` and a baseline; ``merge`` combines shard folders; ``summary`` writes the reports; ``records`` is the
per-model record they all share.
"""
from __future__ import annotations

from mmdetect.sweep.config import Activations, Entry, Expect, ScanOptions, Zoo, load_config, resolve_model
from mmdetect.sweep.gates import exit_code
from mmdetect.sweep.merge import merge
from mmdetect.sweep.records import Drift, ModelRecord, RecordError
from mmdetect.sweep.run import SweepResult, output_folder, parse_shard, run_sweep, run_units, select

__all__ = ["Activations", "Drift", "Entry", "Expect", "ModelRecord", "RecordError", "ScanOptions", "SweepResult", "Zoo",
           "exit_code", "load_config", "merge", "output_folder", "parse_shard", "resolve_model", "run_sweep",
           "run_units", "select"]
