"""``mmdetect track``: when do memory-management neurons appear during training?

    >>> from mmdetect.track import track
    >>> result = track(["EleutherAI/pythia-70m"], revisions=["step0", "step1000", "step143000"], output_dir="out")

See ``mmdetect.track.run`` for the outputs and ``mmdetect.track.inputs`` for how checkpoints and steps are given.
"""
from __future__ import annotations

from mmdetect.track.inputs import TrackPoint, expand_pattern, parse_revisions, parse_steps, plan_points, step_from_name
from mmdetect.track.run import TrackResult, aggregate, track

__all__ = ["TrackResult", "TrackPoint", "aggregate", "expand_pattern", "parse_revisions", "parse_steps", "plan_points",
           "step_from_name", "track"]
