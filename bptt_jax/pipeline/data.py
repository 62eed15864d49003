"""The run's data: the test / training split of the records (:func:`load_split`), relaxation and force items,
and batches grouped by size bucket. :func:`load_data` is the pipeline's first stage.

The readers and generators themselves are :mod:`bptt_jax.data`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import jax
import numpy as np

from bptt_jax import parallel
from bptt_jax.data.trajectory import DataError, SkipLog, Trajectory, filter_usable
from bptt_jax.pipeline.config import DataConfig, RunConfig
from bptt_jax.structures import Batch, Structure, bucket_size

log = logging.getLogger("bptt_jax")


def _records(cfg: DataConfig, skipped: SkipLog, progress: bool = True) -> Iterator[Union[Trajectory, DataError]]:
    """Every record of the configured source in order, a skipped one as its :class:`DataError` (counted in
    ``skipped``); at most ``cfg.n`` of them (a generated set: the preset's size when ``n`` is None)."""
    from bptt_jax.data.readers import read_trajectories

    if cfg.path:
        yield from read_trajectories(Path(cfg.path), strict=cfg.strict, skipped=skipped, fmt=cfg.format,
                                     limit=cfg.n, placeholders=True)
        return
    from bptt_jax.data.generate import generate, make_params

    n = cfg.n if cfg.n is not None else make_params(cfg.name, cfg.preset, **cfg.generator).n
    out = generated_dir(cfg)
    manifest = generate(cfg.name, out, preset=cfg.preset, seed=cfg.seed, workers=cfg.workers,
                        progress=progress, n=n, **cfg.generator)
    for rec in manifest["trajectories"][:n]:
        yield from read_trajectories(out / rec["file"], strict=cfg.strict, skipped=skipped, placeholders=True)


def generated_dir(cfg: DataConfig) -> Path:
    """Where the generator ``cfg.name`` caches its trajectories for this preset, size and seed."""
    from bptt_jax.data.generate import make_params

    n = cfg.n if cfg.n is not None else make_params(cfg.name, cfg.preset, **cfg.generator).n
    return Path(cfg.cache_dir) / f"{cfg.name}-{cfg.preset}-n{n}-s{cfg.seed}"


@dataclasses.dataclass
class Split:
    """The usable trajectories of each split, and how many records each split was cut from."""

    train: list[Trajectory]
    test: list[Trajectory]
    train_records: int
    test_records: int

    def describe(self) -> str:
        return (f"test: {len(self.test)} usable of the first {self.test_records} records; train: "
                f"{len(self.train)} of the {self.train_records} after them")


def size_limit(buckets: Sequence[int], max_atoms: Optional[int]) -> tuple[int, str]:
    """The largest structure a run takes (atoms) and the setting that decides it: a model with a fixed input size
    (ResMLP's ``max_atoms``, whose own size is a bucket, :func:`model_buckets`), else the largest size bucket."""
    if max_atoms is not None:
        return int(max_atoms), (f"the model takes at most max_atoms={max_atoms} "
                                 f"(model.preset, model.overrides.max_atoms)")
    return int(max(buckets)), f"the largest of dataset.buckets is {max(buckets)}"


def load_split(cfg: DataConfig, skipped: SkipLog, progress: bool = True,
               max_atoms: Optional[int] = None) -> Split:
    """Read (or generate, then read) the configured records and split them as the paper does: the test split
    is the first ``n_test`` records *before* anything is filtered (so it is the same records whatever is
    skipped), the training split the rest; then each keeps its usable trajectories (bad records, ≤ 2 frames,
    changing atom counts, and structures larger than :func:`size_limit` (the model's ``max_atoms``, else the
    largest of ``cfg.buckets``) are skipped and counted in ``skipped``; in strict mode a too-large structure is
    an error naming the setting)."""
    records = list(_records(cfg, skipped, progress))
    test_raw, train_raw = records[:cfg.n_test], records[cfg.n_test:]
    limit, why = size_limit(cfg.buckets, max_atoms)
    too_large = []

    def usable(part):
        keep = []
        for t in filter_usable((r for r in part if isinstance(r, Trajectory)), skipped):
            if t.n_atoms <= limit:
                keep.append(t)
                continue
            err = DataError(t.source or t.id, None, f"{t.n_atoms} atoms, more than this run takes: {why}",
                            kind="too_large")
            if cfg.strict:
                raise err
            skipped.add(err.kind, str(err))
            too_large.append(str(err))
        return keep

    split = Split(usable(train_raw), usable(test_raw), len(train_raw), len(test_raw))
    if too_large:
        log.warning("skipped %d structure(s) larger than %d atoms (%s); the first: %s", len(too_large), limit, why,
                    too_large[0])
    return split


def load_trajectories(cfg: DataConfig, skipped: SkipLog, progress: bool = True) -> list[Trajectory]:
    """The usable trajectories of the configured source, in order (test split first)."""
    parts = load_split(cfg, skipped, progress)
    return parts.test + parts.train


def relaxation_items(trajs: Sequence[Trajectory]) -> list[tuple[Structure, np.ndarray]]:
    return [t.relaxation_pair() for t in trajs]


def force_items(trajs: Sequence[Trajectory], stride: int = 1) -> list[Structure]:
    """Every ``stride``-th frame (and always the last) of each trajectory that has forces."""
    out = []
    for t in trajs:
        if t.forces is None or t.endpoints_only:
            continue
        idx = list(range(0, t.n_frames, max(stride, 1)))
        if idx[-1] != t.n_frames - 1:
            idx.append(t.n_frames - 1)
        out.extend(t.frame(i) for i in idx)
    return out


def batch_plan(sizes: Sequence[int], batch_size: int, buckets: Sequence[int],
               rng: Optional[np.random.Generator] = None) -> list[tuple[int, list[int]]]:
    """Group item indices by size bucket into batches of at most ``batch_size``: [(n_atoms, indices)].

    With ``rng``, items are shuffled within buckets and the batch order is shuffled (training); without,
    the order is deterministic (evaluation). Each bucket compiles once.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(sizes):
        groups[bucket_size(n, buckets)].append(i)
    plan = []
    for n_pad in sorted(groups):
        idx = np.asarray(groups[n_pad])
        if rng is not None:
            idx = rng.permutation(idx)
        plan.extend((n_pad, idx[i:i + batch_size].tolist()) for i in range(0, len(idx), batch_size))
    if rng is not None:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def model_buckets(buckets: Sequence[int], max_atoms: Optional[int]) -> tuple[int, ...]:
    """Size buckets a model with a fixed input size (ResMLP's ``max_atoms``) can take: those below the limit
    and the limit itself, so that e.g. 216-site cells pad to 220 rather than 224."""
    if max_atoms is None:
        return tuple(buckets)
    return tuple(sorted({int(b) for b in buckets if b < max_atoms} | {int(max_atoms)}))


def relax_batches(items, batch_size, buckets, rng=None) -> list[tuple[list[int], Batch]]:
    plan = batch_plan([len(s) for s, _ in items], batch_size, buckets, rng)
    return [(idx, Batch.from_structures([items[i][0] for i in idx], [items[i][1] for i in idx],
                                        n_atoms=n_pad, batch_size=batch_size)) for n_pad, idx in plan]


def force_batches(frames, batch_size, buckets, rng=None) -> list[Batch]:
    plan = batch_plan([len(s) for s in frames], batch_size, buckets, rng)
    return [Batch.from_structures([frames[i] for i in idx], n_atoms=n_pad, batch_size=batch_size,
                                  with_forces=True) for n_pad, idx in plan]


# ---------------------------------------------------------------------------------------------------
# The stage


@dataclasses.dataclass
class Data:
    """What the later stages relax and train on.

    ``train`` is the training split (at most ``data.max_train`` trajectories); its last ``finetune.val_fraction``
    are BPTT's validation split (``val``), the rest BPTT's training set (``fit_items``). Pretraining uses every
    training trajectory's frames (``frames``)."""

    split: Split
    skipped: SkipLog
    train: list[Trajectory]
    val: list[Trajectory]
    test: list[Trajectory]
    fit_items: list[tuple[Structure, np.ndarray]]  # BPTT's training relaxations (start, target)
    val_items: list[tuple[Structure, np.ndarray]]
    test_items: list[tuple[Structure, np.ndarray]]
    buckets: tuple[int, ...]
    test_batches: list[tuple[list[int], Batch]]
    val_batches: list[tuple[list[int], Batch]]
    frames: list[Structure]  # pretraining's force frames (every pretrain.frame_stride-th)
    test_frames: list[Structure]  # the test split's, for the force errors
    seconds: float

    @property
    def sample(self) -> Batch:
        """A batch to initialise parameters with (the first test batch)."""
        return self.test_batches[0][1]


def load_data(cfg: RunConfig, max_atoms: Optional[int]) -> Data:
    """Read (or generate) the records, split them and cut BPTT's validation split from the training one.

    ``max_atoms``: the model's fixed input size (ResMLP), or None. Multi-host: process 0 generates a missing
    data set while the others wait, then they read its cache."""
    t0 = time.time()
    skipped = SkipLog()
    primary, several = parallel.is_primary(), jax.process_count() > 1
    if several and not primary:
        parallel.sync("data generated")
    parts = load_split(cfg.data, skipped, cfg.progress, max_atoms)
    if several and primary:
        parallel.sync("data generated")
    train_trajs, test_trajs = parts.train, parts.test
    if cfg.data.max_train is not None:
        train_trajs = train_trajs[:cfg.data.max_train]
    n_val = int(round(cfg.finetune.val_fraction * len(train_trajs))) if cfg.finetune.epochs else 0
    if not train_trajs or not test_trajs or (cfg.finetune.val_fraction and cfg.finetune.epochs and not n_val):
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.counts.items()))
        hint = ""
        if skipped.counts.get("too_large"):
            hint = f"; too large: {size_limit(cfg.data.buckets, max_atoms)[1]}"
        raise ValueError(f"need training, validation and test trajectories; have {len(train_trajs)} train and "
                         f"{len(test_trajs)} test after skipping {skipped.total}" + (f" ({reasons})" if reasons else "")
                         + hint)
    # The last val_fraction of the training trajectories: BPTT's validation split (its starting step size and
    # the epoch it delivers are chosen on it; the test split only gives the reported figures).
    val_trajs = train_trajs[len(train_trajs) - n_val:] if n_val else []
    fit_trajs = train_trajs[:len(train_trajs) - n_val]
    fit_items, test_items = relaxation_items(fit_trajs), relaxation_items(test_trajs)
    val_items = relaxation_items(val_trajs)
    buckets = model_buckets(cfg.data.buckets, max_atoms)
    frames = force_items(train_trajs, cfg.pretrain.frame_stride)
    data = Data(parts, skipped, train_trajs, val_trajs, test_trajs, fit_items, val_items, test_items, buckets,
                test_batches=relax_batches(test_items, cfg.eval.batch_size, buckets),
                val_batches=relax_batches(val_items, cfg.eval.batch_size, buckets) if val_items else [],
                frames=frames, test_frames=force_items(test_trajs, max(1, cfg.pretrain.frame_stride)),
                seconds=time.time() - t0)
    log.info("data: %d train (%d of them BPTT validation) / %d test trajectories, %d training frames, %d skipped; %s",
             len(train_trajs), len(val_trajs), len(test_trajs), len(frames), skipped.total, parts.describe())
    return data
