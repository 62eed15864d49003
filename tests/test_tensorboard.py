"""Training curves as TensorBoard event files (bptt_jax/pipeline/curves.py): rows become tags at the steps of their
epochs, a resume writes each step once, only the primary process writes, and a missing tensorboardX is refused
before any work. The whole pipeline's curves are checked against its metrics.csv and results.json in
tests/test_pipeline.py (test_fine_tuning_keeps_the_best_validation_epoch and the resume of
test_the_stages_in_order), on runs those tests make anyway."""

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest

from bptt_jax import parallel
from bptt_jax.pipeline import DataConfig, LoggingConfig, RunConfig, TrainingCurves, run_pipeline
from conftest import tensorboard_events, tensorboard_scalars


def _run_config(tmp_path, **logging):
    return RunConfig(run_dir=str(tmp_path / "run"), logging=LoggingConfig(**logging))


def _writer_threads():
    """tensorboardX's writing threads alive (its queue's feeder thread ends by itself once the queue is closed)."""
    return [t for t in threading.enumerate() if type(t).__name__ == "_EventLoggerThread"]


def test_off_writes_nothing(tmp_path):
    for curves in (TrainingCurves(), TrainingCurves.open(_run_config(tmp_path), tmp_path / "run")):
        with curves:
            assert not curves.enabled
            curves.epoch("pretrain", {"epoch": 1, "train_force_mse": 0.5})
            curves.restored("bptt", [{"epoch": 1, "train_loss": 1.0}])
            curves.results({"avg_dq": {"bptt": 1.0}}, "| table |", step=1)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_rows_become_tags_at_their_epochs(tmp_path):
    cfg = _run_config(tmp_path, tensorboard=True, dir=str(tmp_path / "tb"))  # dir set: there, not in the run dir
    table = "| method | Avg Dq |\n| --- | --- |\n| BPTT-tuned | 1.5 |"
    with TrainingCurves.open(cfg, tmp_path / "run") as curves:
        assert curves.enabled and curves.log_dir == tmp_path / "tb" and _writer_threads()
        curves.epoch("pretrain", {"epoch": 1, "train_force_mse": 0.25, "lr": 2e-3, "best_epoch": 1})
        curves.epoch("bptt", {"epoch": 2, "train_loss": 3.5, "val_loss": None, "seconds": 12.25, "train_diverged": 0,
                              "stop": "max_epochs", "flag": True, "step_size": np.float32(0.05)})
        curves.scalars("bptt_step", {"loss": 4.0}, 7)
        curves.results({"avg_dq": {"initial": 9.0, "bptt": 1.5, "fire": None}, "reduction_pct": 25.0,
                        "step_size_final": 0.06}, table, step=2)
    assert not (tmp_path / "run").exists()
    scalars = tensorboard_scalars(tmp_path / "tb")
    expected = {"pretrain/train_force_mse": [(1, 0.25)], "pretrain/lr": [(1, 2e-3)], "pretrain/best_epoch": [(1, 1)],
                "bptt/train_loss": [(2, 3.5)], "bptt/seconds": [(2, 12.25)], "bptt/train_diverged": [(2, 0)],
                "bptt/step_size": [(2, 0.05)], "bptt_step/loss": [(7, 4.0)],
                "results/avg_dq/initial": [(2, 9.0)], "results/avg_dq/bptt": [(2, 1.5)],
                "results/reduction_pct": [(2, 25.0)], "results/step_size_final": [(2, 0.06)]}
    assert set(scalars) == set(expected)  # None, strings and flags are left out
    for tag, points in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in scalars[tag]], [v for _, v in points], rtol=1e-6, err_msg=tag)
    (text,) = [v for e in tensorboard_events(tmp_path / "tb") for v in e.summary.value if v.tag.startswith("results")
               and not v.HasField("simple_value")]
    assert text.tensor.string_val[0].decode() == table


def test_a_resume_writes_each_step_once(tmp_path):
    """The first writer is fresh and writes restored rows too; a second one in the same directory (opened within
    the same second: its own file) writes only what it adds. Both files stay whole."""
    rows = [{"epoch": e, "train_loss": float(e)} for e in (1, 2)]
    with TrainingCurves(tmp_path) as first:
        assert first.fresh
        first.restored("pretrain", [{"epoch": 1, "val_force_mse": 0.5}])  # e.g. model.init_from's history
        for row in rows:
            first.epoch("bptt", row)
    with TrainingCurves(tmp_path) as second:
        assert not second.fresh
        second.restored("pretrain", [{"epoch": 1, "val_force_mse": 0.5}])
        second.restored("bptt", rows)
        second.epoch("bptt", {"epoch": 3, "train_loss": 3.0})
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    scalars = {tag: sorted(points) for tag, points in tensorboard_scalars(tmp_path).items()}
    assert scalars == {"pretrain/val_force_mse": [(1, 0.5)], "bptt/train_loss": [(1, 1.0), (2, 2.0), (3, 3.0)]}


def test_only_the_primary_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "is_primary", lambda: False)
    with TrainingCurves.open(_run_config(tmp_path, tensorboard=True), tmp_path / "run") as curves:
        assert not curves.enabled
    assert not (tmp_path / "run").exists()


def test_missing_tensorboardx_is_one_line_before_any_work(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX"
                        else find_spec(name, *a))
    cfg = _run_config(tmp_path, tensorboard=True)
    _run_config(tmp_path).validate()  # off: no need of it
    with pytest.raises(ValueError) as err:
        run_pipeline(cfg)
    assert "bptt-jax[tensorboard]" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before the run directory, let alone data or compilation


def test_a_failing_run_closes_its_event_file(tmp_path):
    cfg = _run_config(tmp_path, tensorboard=True)
    cfg.data = DataConfig(path=str(tmp_path / "missing"))
    with pytest.raises((ValueError, OSError)):
        run_pipeline(cfg)
    (event,) = tensorboard_events(Path(cfg.run_dir) / "tensorboard")  # whole: the file's version record
    assert event.file_version.startswith("brain.Event")
    assert not _writer_threads()
