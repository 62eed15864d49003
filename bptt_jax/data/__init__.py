"""Data: the :class:`Trajectory` record, readers for real formats, offline generators, splits.

``python -m bptt_jax.data generate NAME --out DIR`` and ``python -m bptt_jax.data inspect PATH``.
"""

from bptt_jax.data.readers import format_summary, read_trajectories, summarize
from bptt_jax.data.trajectory import DataError, SkipLog, Trajectory, filter_usable, split, unusable_reason

__all__ = ["DataError", "SkipLog", "Trajectory", "filter_usable", "format_summary", "read_trajectories", "split",
           "summarize", "unusable_reason"]
