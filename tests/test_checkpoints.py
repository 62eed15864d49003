"""Checkpoints that a kill, a full disk or a bad copy damaged (bptt_jax/pipeline/checkpoints.py), and pretraining
resumed from its own checkpoints bit for bit (bptt_jax/pipeline/pretraining.py). The CLI runs killed with SIGKILL
and resumed are tests/test_train.py's."""

import dataclasses
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_jax.models import build_model
from bptt_jax.pipeline import (DamagedCheckpointError, ModelConfig, PretrainConfig, RunConfig, latest_step, pretrain,
                               pretrained_dir, pretrained_model, pretraining_dir, restore_checkpoint, restore_latest,
                               save_checkpoint)
from bptt_jax.pipeline import pretraining
from bptt_jax.pipeline.checkpoints import CHECKSUMS, _write_checksums
from bptt_jax.structures import Batch, Structure
from conftest import rattled_si

# A restore that fails leaves orbax's reading coroutines unawaited; Python reports them when it collects them.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _tree(x):
    return {"w": jnp.full((40, 3), x, jnp.float32), "b": {"c": jnp.arange(50, dtype=jnp.int32) + int(x)}}


def _largest_file(step_dir):
    """The step's largest file (an array's data) other than the checksum list."""
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _largest_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _overwrite(step_dir):  # same size, other bytes: orbax alone may read such a file without noticing
    f = _largest_file(step_dir)
    raw = bytearray(f.read_bytes())
    raw[-16:] = bytes(b ^ 0xFF for b in raw[-16:])
    f.write_bytes(bytes(raw))


def _delete(step_dir):
    _largest_file(step_dir).unlink()


@pytest.mark.parametrize("damage", [_truncate, _overwrite, _delete])
def test_a_damaged_latest_step_is_set_aside_for_the_one_before(tmp_path, caplog, damage):
    path = tmp_path / "checkpoints" / "bptt"
    for step in (1, 2, 3):
        save_checkpoint(path, step, _tree(step), {"epoch": step})
    damage(path / "3")
    # A save killed half-way leaves orbax's tmp folder: no step.
    tmp = path / "4.orbax-checkpoint-tmp-1796316200123456"
    tmp.mkdir()
    (tmp / "partial").write_bytes(b"\0" * 10)
    assert latest_step(path) == 3

    with pytest.raises(DamagedCheckpointError, match=f"{path / '3'}"):
        restore_checkpoint(path, _tree(0))
    with caplog.at_level(logging.WARNING, logger="bptt_jax"):
        tree, meta, step = restore_latest(path, _tree(0))
    assert step == 2 and meta == {"epoch": 2}
    jax.tree_util.tree_map(np.testing.assert_array_equal, tree, _tree(2))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"damaged checkpoint {path / '3'}" in warning and "using step 2" in warning
    assert latest_step(path) == 2 and (tmp_path / "checkpoints" / "damaged" / "bptt-3").is_dir()
    # Training writes step 3 again (the tmp folder of the interrupted save goes with the next save).
    save_checkpoint(path, 3, _tree(3), {"epoch": 3})
    assert restore_latest(path, _tree(0))[2] == 3 and not tmp.exists()


def test_no_proof_of_damage_moves_nothing(tmp_path, caplog):
    """A step without checksums (an old run's) restores unverified. Steps that fail to restore for another reason
    (here: a model of other shapes) are left alone and the error raised; steps all proved damaged by their
    checksums are set aside and nothing is restored."""
    path = tmp_path / "ckpt"
    for step in (1, 2):
        save_checkpoint(path, step, _tree(step), {"epoch": step})
    (path / "1" / CHECKSUMS).unlink()  # a step written before the checksums: restored unverified
    tree, meta, _ = restore_checkpoint(path, _tree(0), step=1)
    assert meta == {"epoch": 1} and int(tree["b"]["c"][0]) == 1
    other = {"w": jnp.zeros((7, 3)), "b": {"c": jnp.zeros(50, jnp.int32)}}
    with pytest.raises(Exception):
        restore_latest(path, other)
    assert latest_step(path) == 2 and not (tmp_path / "damaged").exists()
    _write_checksums(path / "1")
    for step in (1, 2):
        _overwrite(path / str(step))
    with caplog.at_level(logging.WARNING, logger="bptt_jax"):
        assert restore_latest(path, _tree(0)) is None
    assert latest_step(path) is None and sorted(p.name for p in (tmp_path / "damaged").iterdir()) == ["ckpt-1",
                                                                                                     "ckpt-2"]
    assert sum("no step before it" in r.getMessage() for r in caplog.records) == 2


def _frames(n=20):
    """Force-matching frames: rattled 2- and 8-atom Si cells with made-up forces (any target does here)."""
    frames = []
    for i in range(n):
        s, _ = rattled_si(cubic=bool(i % 2), seed=i)
        forces = np.random.default_rng(i).normal(0.0, 0.5, s.positions.shape)
        frames.append(Structure(s.positions, s.numbers, s.cell, s.pbc, forces=forces))
    return frames


PCFG = PretrainConfig(max_epochs=2, batch_size=4, schedule="plateau", patience=None, checkpoint_every=2)


class _Killed(Exception):
    pass


def test_pretraining_resumes_bit_for_bit(tmp_path, monkeypatch, caplog):
    """Pretraining killed in the middle of an epoch (after a checkpoint), its newest checkpoint damaged, resumed:
    the same best parameters and history, bit for bit, as without the interruption (the reduce-on-plateau
    optimiser state, the shuffles and the epoch's losses so far all come from the checkpoint). Then the same at
    the stage: a damaged ``checkpoints/pretrained`` is taken again from pretraining's final state, untrained."""
    frames = _frames()
    model = build_model("adapt", "tiny")
    params = model.init(jax.random.PRNGKey(0), Batch.from_structures(frames[:2]))
    buckets = (8,)
    ref_params, ref_history = pretrain(model, params, frames, PCFG, buckets, 0, progress=False,
                                       checkpoints=tmp_path / "ref")
    assert len(ref_history) == 2 and ref_history[-1]["stop"] == "max_epochs"

    saves = []
    real_save = pretraining.save_checkpoint

    def killed_after_five(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(args[3])
        if len(saves) == 5:
            raise _Killed

    monkeypatch.setattr(pretraining, "save_checkpoint", killed_after_five)
    with pytest.raises(_Killed):
        pretrain(model, params, frames, PCFG, buckets, 0, progress=False, checkpoints=tmp_path / "run")
    monkeypatch.setattr(pretraining, "save_checkpoint", real_save)
    # 7 train frames' batches of 4 in one 8-atom bucket, 2 per checkpoint: mid-epoch saves at steps 2 and 4
    n_batches = len(saves[3]["losses"]) + 2  # the 4th save: epoch 2 after 2 steps; the 5th: after 4
    assert [(s["epoch"], s["position"]) for s in saves] == [(0, 2), (0, 4), (1, 0), (1, 2), (1, 4)], n_batches
    newest = tmp_path / "run" / str(latest_step(tmp_path / "run"))
    _truncate(newest)
    resumed = []
    with caplog.at_level(logging.INFO, logger="bptt_jax"):
        got_params, got_history = pretrain(model, params, frames, PCFG, buckets, 0, progress=False,
                                           checkpoints=tmp_path / "run", resume=True, on_resume=resumed.append)
    assert any(f"damaged checkpoint {newest}" in r.getMessage() for r in caplog.records)
    assert "resumed pretraining after 1 epochs and 2 steps" in caplog.text
    assert resumed == [ref_history[:1]]
    assert got_history == ref_history
    jax.tree_util.tree_map(np.testing.assert_array_equal, got_params, ref_params)

    # The stage: trained and saved; checkpoints/pretrained damaged; resumed from pretraining's last state.
    cfg = RunConfig(model=ModelConfig(preset="tiny"), pretrain=PCFG, run_dir=str(tmp_path / "stage"), progress=False)
    data = types.SimpleNamespace(sample=Batch.from_structures(frames[:2]), frames=frames, buckets=buckets)
    key = jax.random.PRNGKey(0)
    first = pretrained_model(cfg, model, data, key, tmp_path / "stage")
    _delete(pretrained_dir(tmp_path / "stage") / "0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bptt_jax"):
        again = pretrained_model(dataclasses.replace(cfg, resume=True), model, data, key, tmp_path / "stage")
    assert f"damaged checkpoint {pretrained_dir(tmp_path / 'stage') / '0'}" in caplog.text
    assert "resumed pretraining after 2 epochs and 0 steps" in caplog.text  # the final state: nothing to train
    assert again.history == first.history
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, first.params)
    restored, meta, _ = restore_checkpoint(pretrained_dir(tmp_path / "stage"), first.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, first.params)
    assert meta["history"] == first.history and latest_step(pretraining_dir(tmp_path / "stage")) is not None
