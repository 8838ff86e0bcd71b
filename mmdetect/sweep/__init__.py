"""Zoo sweeps: a YAML config of models -> one scan per model -> summary, regression gates, plots; and merge."""
from __future__ import annotations

from mmdetect.sweep.run import (Entry, Expect, SweepResult, Zoo, exit_code, load_config, merge, parse_shard,
                                resolve_model, run_sweep, select)

__all__ = ["Entry", "Expect", "SweepResult", "Zoo", "exit_code", "load_config", "merge", "parse_shard",
           "resolve_model", "run_sweep", "select"]
