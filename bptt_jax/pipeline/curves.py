"""Training curves as TensorBoard event files (``logging.tensorboard=true``), written with tensorboardX (the extra
``tensorboard``; TensorFlow is not needed).

Tags and their steps (the x axis):

- ``pretrain/<column>``: each pretraining epoch's row of ``metrics.csv`` (``train_force_mse``, ``val_force_mse``,
  ``val_force_l2``, ``lr``, ``best_epoch``) at its epoch number.
- ``bptt/<column>``: each BPTT epoch's row (``train_loss``, ``val_loss``, ``test_loss``, ``step_size`` η,
  ``seconds``, ...) at its epoch number; epoch 0 is the starting model (validation and test loss, η).
- ``bptt_step/{loss, frames, diverged, adjoint_residual}``: each BPTT training step at its optimiser step
  ``epoch · steps_per_epoch + i`` (1-based); the host already has these numbers, so logging them costs no sync.
- ``results/avg_dq/<method>``, ``results/reduction_pct``, ...: the headline results at the last BPTT epoch, and
  the comparison table as text (``results``).

Steps are derived from epoch and step numbers, never from a count of what was written, so a resumed run writes
the epochs it trains at the steps they always had. Epochs a resume restores from checkpoints (and
``model.init_from``'s pretraining history) are written only into a directory without event files, where no
earlier run wrote them (TensorBoard turned on at the resume). An epoch interrupted after its curves were
written and trained again on resume is written again at the same steps.
"""

from __future__ import annotations

import numbers
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

from bptt_jax import parallel
from bptt_jax.pipeline.config import RunConfig


class TrainingCurves:
    """Scalars for TensorBoard, or nothing: ``TrainingCurves()`` (off) takes every call and writes nothing, so
    the stages call it whether logging is on or not.

    Args:
      log_dir: the event files' directory (made if missing); None: off.
    """

    def __init__(self, log_dir: Optional[Path] = None):
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.fresh = False  # no event file was in log_dir before this writer's
        self._writer = None
        if self.log_dir is not None:
            from tensorboardX import SummaryWriter

            self.fresh = not any(self.log_dir.glob("events.out.tfevents.*"))
            # tensorboardX names the file by the second and the host: a second writer opened within the same
            # second (a quick resume) would truncate the first one's file without a suffix of its own.
            self._writer = SummaryWriter(str(self.log_dir), filename_suffix=f".{uuid.uuid4().hex[:8]}")

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path) -> "TrainingCurves":
        """The run's curves: on when ``cfg.logging.tensorboard``, and then on the primary process only."""
        if not (cfg.logging.tensorboard and parallel.is_primary()):
            return cls()
        return cls(Path(cfg.logging.dir) if cfg.logging.dir else Path(run_dir) / "tensorboard")

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """``prefix/name`` at ``step`` for each number in ``values`` (None, strings and flags are left out)."""
        if self._writer is None:
            return
        for name, value in values.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{name}", float(value), int(step))

    def epoch(self, stage: str, row: dict[str, Any]) -> None:
        """One row of ``metrics.csv`` (``stage``: pretrain or bptt) at the step of its ``epoch``."""
        self.scalars(stage, {k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

    def restored(self, stage: str, rows: Iterable[dict[str, Any]]) -> None:
        """Rows a run restored instead of computing them: written only into a fresh directory (an earlier run
        that logged has them already)."""
        if self.fresh:
            for row in rows:
                self.epoch(stage, row)

    def results(self, results: dict[str, Any], table: str, step: int) -> None:
        """The headline figures of ``results.json`` (Avg Dq, or Avg MSE under ``loss=mse``, of each method; the
        reductions; the final η) and the comparison ``table`` (markdown) as text."""
        self.scalars("results/avg_dq", results["avg_dq"], step)
        self.scalars("results", {k: results.get(k) for k in ("reduction_pct", "reduction_vs_fire_pct",
                                                            "reduction_vs_force_control_pct", "step_size_final")},
                     step)
        if self._writer is not None:
            self._writer.add_text("results", table, int(step))

    def close(self) -> None:
        """Write what is queued and close the file (the writer's thread ends)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TrainingCurves":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
