"""A finished run's model, parameters and learned relaxation, outside the run that made it (:func:`load_run`).

A run directory describes itself: ``run_config.json`` names the model (name, preset, overrides, matmul dtype)
and the relaxation (rule, step mode and head, stop rule); ``results.json`` has the starting step and the
delivered epoch; the orbax checkpoints hold the parameters. No Hydra config is needed::

    run = bptt_jax.load_run("runs/2026-12-03_14-05-00")          # the delivered (validation-best) epoch
    outcomes, stats = run.relax(structures)                       # early exit, in-flight batching
    forces = run.forces(batch)                                    # (B, N, 3) eV/Å

Runs written before each setting had one home (rule and step mode under ``finetune``) load as well
(:meth:`~bptt_jax.pipeline.config.RunConfig.from_dict`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np

from bptt_jax.bptt import BPTT, Params
from bptt_jax.inference import InferenceStats, RelaxOutcome, relax_many
from bptt_jax.pipeline.checkpoints import bptt_dir, latest_step, pretrained_dir, restore_checkpoint
from bptt_jax.pipeline.config import RunConfig
from bptt_jax.pipeline.finetuning import make_bptt, starting_params
from bptt_jax.structures import Batch, Structure

Checkpoint = Union[str, int]


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A model and the relaxation it was tuned with, ready to use.

    Attributes:
      path: the run directory.
      config: its configuration.
      bptt: the model with its relaxation: the update rule, the step size (a learned scalar or head lives in
        ``params``), the stop rule and frame budget, the loss.
      params: ``{"model": ..., ["log_step_size"], ["step_head"]}``.
      checkpoint: what was loaded: ``"final"`` (the delivered epoch), ``"pretrained"`` or an epoch number.
      epoch: the BPTT epoch of the parameters (0: the pretrained model).
      elements: the atomic numbers of the run's training data (None: not recorded, runs before 2026-12-03).
      pretrained: the force-trained model's parameters (the ``checkpoints/pretrained`` step), whatever
        ``checkpoint`` loaded: what the constant-step and FIRE baselines relax with.
    """

    path: Path
    config: RunConfig
    bptt: BPTT
    params: Params
    checkpoint: Checkpoint
    epoch: int
    elements: Optional[frozenset[int]] = None
    pretrained: Optional[Any] = None

    @property
    def model(self):
        """The Flax force model: ``model.apply(params["model"], batch) -> (B, N, 3)`` forces in eV/Å."""
        return self.bptt.model

    @property
    def step_size(self) -> Optional[float]:
        """The scalar step size η (Å²/eV) of the relaxation; None for a step head or FIRE."""
        if self.bptt.relax.rule == "fire":
            return None
        eta = self.bptt.step_size(self.params)
        return None if eta is None else float(eta)

    def forces(self, batch: Batch) -> jax.Array:
        """Model forces (B, N, 3) in eV/Å at ``batch.positions``."""
        return self.bptt.forces(self.params, batch)

    def relax(self, structures: Sequence[Structure], targets=None, *, batch_size: int = 16,
              **kwargs) -> tuple[list[RelaxOutcome], InferenceStats]:
        """Relax ``structures`` with the tuned relaxation (:func:`~bptt_jax.inference.relax_many`: size buckets,
        early exit, in-flight batching); ``targets`` give each outcome its loss."""
        kwargs.setdefault("buckets", self.buckets)
        return relax_many(self.bptt, self.params, structures, targets, batch_size=batch_size, **kwargs)

    @property
    def buckets(self) -> tuple[int, ...]:
        """The padding sizes the model takes (a fixed-size model: up to its ``max_atoms``)."""
        from bptt_jax.pipeline.data import model_buckets

        return model_buckets(self.config.data.buckets, getattr(self.model, "max_atoms", None))


def _template_batch(model) -> Batch:
    """A one-structure batch whose shapes initialise ``model``'s parameters (they do not depend on the atom count,
    except for a fixed-size model, which gets its ``max_atoms``)."""
    s = Structure(positions=[[0.0, 0.0, 0.0], [1.36, 1.36, 1.36]], numbers=[14, 14], cell=np.eye(3) * 5.43,
                  pbc=[True] * 3)
    return Batch.from_structures([s], [s.positions], n_atoms=getattr(model, "max_atoms", None) or 2)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {what}; is {path.parent} a finished bptt-jax run directory?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def load_run(run_dir: Union[str, Path], checkpoint: Checkpoint = "final") -> LoadedRun:
    """The model, parameters and relaxation of the run in ``run_dir``.

    Args:
      run_dir: a run directory written by ``python -m bptt_jax.train`` (or :func:`~bptt_jax.pipeline.run_pipeline`).
      checkpoint: ``"final"``: the epoch the run delivered (its best on validation; 0 is the pretrained model
        with the learned relaxation's starting step); ``"pretrained"``: the force-trained model relaxing with a
        constant step, the validation split's best (the run's starting step); an int: that BPTT epoch.

    Raises:
      FileNotFoundError / ValueError: one line naming the file, e.g. a run that did not finish or an epoch
        that has no checkpoint.
    """
    path = Path(run_dir)
    cfg = RunConfig.from_dict(read_json(path / "run_config.json", "run_config.json"))
    results = read_json(path / "results.json", "results.json (the run did not finish)")
    eta0 = float(results["step_size_initial"])
    model = cfg.model.build()
    sample = _template_batch(model)
    variables, _, _ = restore_checkpoint(pretrained_dir(path), model.init(jax.random.PRNGKey(0), sample))
    kept = (results.get("bptt_selection") or {}).get("kept_epoch") or 0
    used = cfg  # the trainer is the run's own (its optimiser state has that structure), or a plain descent
    if checkpoint == "pretrained":
        used = dataclasses.replace(
            cfg, relax=dataclasses.replace(cfg.relax, rule="descent", step_mode="fixed", step_head=()),
            finetune=dataclasses.replace(cfg.finetune, freeze_model=False))
        epoch = 0
    elif checkpoint == "final":
        epoch = int(kept)
    elif isinstance(checkpoint, (int, np.integer)) and not isinstance(checkpoint, bool):
        epoch = int(checkpoint)
    else:
        raise ValueError(f"checkpoint must be 'final', 'pretrained' or an epoch number, not {checkpoint!r}")
    bptt = make_bptt(used, model, eta0, steps_per_epoch=1)
    params = starting_params(bptt, variables, jax.random.PRNGKey(cfg.seed), sample)  # epoch 0's, as fine_tune's
    if epoch > 0:
        last = latest_step(bptt_dir(path))
        if last is None or epoch > last:
            raise ValueError(f"{bptt_dir(path)}: no checkpoint of epoch {epoch} (the last is {last})")
        like = {"state": bptt.init_state(params, jax.random.PRNGKey(0))}
        params = restore_checkpoint(bptt_dir(path), like, step=epoch)[0]["state"].params
    elements = frozenset(int(z) for z in results["elements"]) if "elements" in results else None
    return LoadedRun(path, cfg, bptt, params, checkpoint, epoch, elements, variables)
