"""The pipeline's stages in process (what each hands on), its data split, model-size buckets, pretraining stop rule
and BPTT's best-epoch selection. ``tests/test_train.py`` runs it from the command line."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from ase.io import write
from hydra import compose, initialize_config_dir

from bptt_jax.data.generate import make_params
from bptt_jax.data.trajectory import SkipLog
from bptt_jax.models import build_model
from bptt_jax.pipeline import (DataConfig, EvalConfig, FinetuneConfig, LoggingConfig, ModelConfig, PretrainConfig,
                               RunConfig, TrainingCurves, load_split, model_buckets, run_pipeline)
from bptt_jax.relax import RelaxConfig
from bptt_jax.train import config_from_hydra
from conftest import rattled_si, tensorboard_scalars

ROOT = Path(__file__).resolve().parents[1]


def _write_dir(tmp_path, lengths, atoms=None):
    """One extxyz file per record, named so that they sort in order; ``lengths`` frames each (a length-1
    record is unusable: too short)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    d = tmp_path / "trajs"
    d.mkdir()
    for i, n in enumerate(lengths):
        start, target = rattled_si(repeat=atoms[i] if atoms else (1, 1, 1), seed=i)
        frames = []
        for k in range(n):
            a = start.to_atoms()
            a.positions = start.positions + (target - start.positions) * k / max(n - 1, 1)
            a.calc = SinglePointCalculator(a, energy=0.0, forces=np.zeros((len(a), 3)))
            frames.append(a)
        write(d / f"r{i:03d}.extxyz", frames, format="extxyz")
    return d


def test_test_split_is_the_first_records_before_filtering(tmp_path):
    # Records 1 and 3 are too short: the test split is 2 usable of the first 4 records, not the first 4 usable.
    d = _write_dir(tmp_path, [4, 1, 4, 1, 4, 4, 4, 1, 4])
    skipped = SkipLog()
    parts = load_split(DataConfig(path=str(d), n_test=4), skipped, progress=False)
    assert (parts.test_records, len(parts.test)) == (4, 2)
    assert [Path(t.source).name.split(".")[0][:4] for t in parts.test] == ["r000", "r002"]
    assert (parts.train_records, len(parts.train)) == (5, 4)
    assert skipped.counts["too_short"] == 3
    assert "2 usable of the first 4 records" in parts.describe()


def test_dataset_n_limits_a_path(tmp_path):
    d = _write_dir(tmp_path, [4] * 9)
    parts = load_split(DataConfig(path=str(d), n=6, n_test=2), SkipLog(), progress=False)
    assert (parts.test_records, parts.train_records) == (2, 4)
    assert [Path(t.source).name[:4] for t in parts.train] == ["r002", "r003", "r004", "r005"]


def test_structures_larger_than_the_model_are_skipped_with_one_line(tmp_path):
    d = _write_dir(tmp_path, [4, 4, 4], atoms=[(1, 1, 1), (3, 2, 2), (1, 1, 1)])  # 2, 24, 2 atoms
    skipped = SkipLog()
    parts = load_split(DataConfig(path=str(d), n_test=1), skipped, progress=False, max_atoms=16)
    assert len(parts.train) == 1 and skipped.counts["too_large"] == 1
    (msg,) = [m for m in skipped.messages if "max_atoms" in m]
    assert "r001" in msg and "24 atoms" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="r001.*24 atoms"):
        load_split(DataConfig(path=str(d), n_test=1, strict=True), SkipLog(), progress=False, max_atoms=16)


def test_resmlp_buckets_stop_at_its_atom_limit():
    model = build_model("resmlp", "paper")
    buckets = model_buckets((8, 16, 64, 192, 224, 256), model.max_atoms)
    assert buckets == (8, 16, 64, 192, 220)
    from bptt_jax.structures import bucket_size
    assert bucket_size(216, buckets) == 220  # 216-site Si cells fit the paper's ResMLP
    assert model_buckets((8, 16), None) == (8, 16)


@pytest.mark.parametrize("dataset,preset,n", [("si_defects", "large", 1500), ("si_defects", "default", 240),
                                              ("catalysts", "default", None), (None, "large", 1500)])
def test_preset_decides_the_size(dataset, preset, n):
    overrides = ([f"+dataset={dataset}"] if dataset else []) + [f"dataset.preset={preset}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run = config_from_hydra(cfg, "/tmp/x")
    assert run.data.n is None  # nothing overrides the preset
    expected = n if n is not None else make_params(run.data.name, preset).n
    assert make_params(run.data.name, run.data.preset).n == expected


def _tiny_run(tmp_path, cache, relax=None, **finetune):
    data = DataConfig(name="si_defects", preset="tiny", n=10, n_test=4, workers=1, cache_dir=str(cache / "data"))
    return RunConfig(
        data=data, model=ModelConfig(preset="tiny"),
        relax=RelaxConfig(**{"max_frames": 8, "step_size": None, "step_mode": "learned", **(relax or {})}),
        pretrain=PretrainConfig(max_epochs=2, schedule="cosine", patience=None),
        finetune=FinetuneConfig(epochs=2, **finetune),
        eval=EvalConfig(step_grid=(0.01, 0.05), fire=False, oracle=False, force_control=False),
        run_dir=str(tmp_path / "run"), progress=False, plots=False)


@pytest.mark.slow
def test_the_stages_in_order(tmp_path, cli_cache):
    """run_pipeline's stages called one by one on the tiny run, as run_pipeline calls them: what each hands on, the
    run directory the report writes from them, a resume that takes both stages that train from checkpoints, and
    the run directory used on its own (``load_run``, the relax CLI)."""
    import jax

    from bptt_jax.pipeline import (Evaluator, baselines, bptt_dir, build_results, equal_compute_control,
                                   evaluate_tuned, fine_tune, latest_step, load_data, pretrained_dir,
                                   pretrained_model, write_run)
    from bptt_jax.pipeline.report import start_run

    cfg = _tiny_run(tmp_path, cli_cache, learning_rate=1e-3)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=1),
                              eval=dataclasses.replace(cfg.eval, force_control=True))
    run_dir = start_run(cfg)
    model = cfg.model.build()
    data = load_data(cfg, getattr(model, "max_atoms", None))
    # The first 4 of the 10 records are the test split; the last of the 6 training trajectories is BPTT's validation.
    assert (len(data.test_items), len(data.fit_items), len(data.val_items)) == (4, 5, 1)
    assert data.val == data.train[-1:] and data.frames and data.sample is data.test_batches[0][1]
    key = jax.random.PRNGKey(cfg.seed)
    curves = TrainingCurves(run_dir / "tensorboard")  # what run_pipeline opens under logging.tensorboard=true

    pre = pretrained_model(cfg, model, data, key, run_dir, curves)
    assert len(pre.history) == 2 and pre.history[-1]["stop"] == "max_epochs"
    assert latest_step(pretrained_dir(run_dir)) == 0

    ev = Evaluator.create(cfg, model, data, key)
    base = baselines(cfg, model, ev, pre.params)
    best = lambda grid: min(grid, key=lambda e: grid[e].avg)  # noqa: E731
    assert set(base.grid) == set(base.val_grid) == {0.01, 0.05}
    assert base.best_step == best(base.grid) and base.val_step == best(base.val_grid)
    assert base.constant_step.per_structure.shape == base.initial.shape == (4,)
    assert base.fire is None and base.oracle is None  # off in the tiny run

    tuned = fine_tune(cfg, model, ev, pre.params, base.val_step, key, run_dir, curves)
    curves.close()
    (row,) = tuned.metrics
    assert row["epoch"] == 1 and row["structure_frames"] > 0 and tuned.step_size_initial == base.val_step
    assert row["skipped_updates"] == 0 and all(r["skipped_updates"] == 0 for r in pre.history)
    assert tuned.kept_epoch == (1 if row["val_loss"] < tuned.val_start else 0)
    assert latest_step(bptt_dir(run_dir)) == 1

    final = evaluate_tuned(ev, tuned.bptt, tuned.params, pre.params)
    kept_test = row["test_loss"] if tuned.kept_epoch else tuned.test_start
    assert final.tuned.avg == pytest.approx(kept_test, rel=1e-6)
    assert all(np.isfinite(final.force_pretrained)) and all(np.isfinite(final.force_tuned))
    control = equal_compute_control(cfg, model, ev, pre.params, tuned.metrics)
    assert control.bptt_structure_frames == row["structure_frames"] and control.epochs >= 1
    assert control.step_size in base.grid

    results = build_results(cfg, data, pre, base, tuned, final, control)
    write_run(cfg, run_dir, results, pre.history, tuned.metrics)
    written = json.loads((run_dir / "results.json").read_text())
    assert written["avg_dq"] == {"initial": pytest.approx(float(base.initial.mean())),
                                 "constant_step": base.constant_step.avg, "fire": None, "bptt": final.tuned.avg,
                                 "oracle": None, "force_control": control.result.avg}
    assert written["bptt_selection"]["kept_epoch"] == tuned.kept_epoch
    assert (written["bptt_train_diverged"], written["bptt_skipped_updates"], written["pretrain_skipped_updates"]) == (
        row["train_diverged"], 0, 0)
    assert list(written["wall_s"]) == ["data", "pretrain", "baselines", "bptt", "evaluate", "force_control"]
    assert [r["stage"] for r in csv.DictReader(open(run_dir / "metrics.csv"))] == ["pretrain"] * 2 + ["bptt"]

    # Resumed, both stages that train restore what they saved instead of training again, and write no curve twice.
    resumed = dataclasses.replace(cfg, resume=True)
    with TrainingCurves(run_dir / "tensorboard") as curves:
        again = pretrained_model(resumed, model, data, key, run_dir, curves)
        assert again.history == pre.history
        jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, pre.params)
        tuned_again = fine_tune(resumed, model, ev, again.params, base.val_step, key, run_dir, curves)
    steps = {tag: [step for step, _ in points] for tag, points in tensorboard_scalars(run_dir / "tensorboard").items()}
    assert steps["pretrain/val_force_mse"] == [1, 2] and steps["bptt/train_loss"] == [1]
    assert steps["bptt/val_loss"] == [0, 1] and steps["bptt_step/loss"] == list(range(1, tuned.steps_per_epoch + 1))
    assert tuned_again.metrics == tuned.metrics and tuned_again.kept_epoch == tuned.kept_epoch
    jax.tree_util.tree_map(np.testing.assert_array_equal, tuned_again.params, tuned.params)

    # The run directory alone gives back the delivered model and its relaxation (bptt_jax.load_run).
    from bptt_jax import load_run

    loaded = load_run(run_dir)
    assert loaded.epoch == tuned.kept_epoch and loaded.config == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, tuned.params)
    starts, targets = [s for s, _ in data.test_items], [t for _, t in data.test_items]
    outcomes, _ = loaded.relax(starts, targets, batch_size=2)
    np.testing.assert_allclose([o.loss for o in outcomes], final.tuned.per_structure, rtol=1e-4)
    pretrained = load_run(run_dir, "pretrained")
    assert pretrained.epoch == 0 and pretrained.step_size == pytest.approx(base.val_step)
    for run in (loaded, pretrained):  # the baselines' model, whatever was loaded
        jax.tree_util.tree_map(np.testing.assert_array_equal, run.pretrained, pretrained.params["model"])
    outcomes, _ = pretrained.relax(starts, targets, batch_size=2)
    np.testing.assert_allclose([o.loss for o in outcomes], base.grid[base.val_step].per_structure, rtol=1e-4)
    for bad, kind, words in ((dict(checkpoint=7), ValueError, "no checkpoint of epoch 7"),
                             (dict(run_dir=tmp_path / "none"), FileNotFoundError, "run_config.json")):
        with pytest.raises(kind) as err:
            load_run(**{"run_dir": run_dir, **bad})
        assert words in str(err.value) and "\n" not in str(err.value)

    # ... and the relax CLI on files: the relaxed structures with their flags; a structure too large for the
    # model or of an element the run never saw, written unrelaxed and flagged; an unreadable file, reported.
    from ase.build import bulk
    from ase.io import read

    from bptt_jax.relax.__main__ import main as relax_main

    too_large, copper = bulk("Si", cubic=True).repeat((5, 5, 3)), starts[1].to_atoms()
    copper.numbers[0] = 29
    write(tmp_path / "in.extxyz", [starts[0].to_atoms(), too_large, copper, starts[1].to_atoms()])
    (tmp_path / "broken.extxyz").write_text("3\nnot a header\nSi 0 0\n")
    assert relax_main([str(run_dir), str(tmp_path / "in.extxyz"), str(tmp_path / "broken.extxyz"),
                       "-o", str(tmp_path / "out.extxyz"), "--batch-size", "2", "--no-progress"]) == 1
    out = read(tmp_path / "out.extxyz", index=":")
    assert [a.info["bptt_status"] for a in out] == ["relaxed", "too_large", "unseen_element", "relaxed"]
    assert [a.info["source"] for a in out] == [f"{tmp_path / 'in.extxyz'}@{i}" for i in range(4)]
    outcomes, _ = loaded.relax(starts[:2], batch_size=2)
    for a, o in zip((out[0], out[3]), outcomes):
        assert a.info["bptt_frames"] == o.frames and a.info["bptt_converged"] == o.converged
        np.testing.assert_allclose(a.positions, o.positions, atol=1e-5)
    np.testing.assert_allclose(out[1].positions, too_large.positions, atol=1e-8)  # as written (extxyz text)
    assert relax_main([str(run_dir), str(tmp_path / "in.extxyz"), "-o", str(tmp_path / "traj.extxyz"),
                       "--trajectory", "--batch-size", "2", "--no-progress"]) == 0
    traj = [a for a in read(tmp_path / "traj.extxyz", index=":") if a.info["source"].endswith("@0")]
    assert len(traj) == outcomes[0].frames + 1
    np.testing.assert_allclose(traj[0].positions, starts[0].positions, atol=1e-6)
    np.testing.assert_allclose(traj[-1].positions, outcomes[0].positions, atol=1e-4)
    # ... and as an ASE calculator: the run's model, forces as load_run's.
    from bptt_jax.ase import Calculator
    from bptt_jax.structures import Batch

    atoms = starts[0].to_atoms()
    atoms.calc = Calculator.from_run(run_dir)
    expected = np.asarray(loaded.forces(Batch.from_structures([starts[0]])))[0, :len(starts[0])]
    np.testing.assert_allclose(atoms.get_forces(), expected, rtol=1e-5, atol=1e-6)
    # ... and the tuned relaxation as an ASE optimizer: the same frames and final positions as load_run's.
    from bptt_jax.ase import LearnedRelaxation

    opt = LearnedRelaxation(atoms, run=loaded)
    opt.run()
    assert opt.status["frames"] == outcomes[0].frames and opt.status["converged"] == outcomes[0].converged
    np.testing.assert_allclose(atoms.positions, outcomes[0].positions, atol=1e-4)


@pytest.mark.slow
def test_fine_tuning_that_gets_worse_keeps_the_starting_model(tmp_path, cli_cache):
    # Gradient *ascent* (a negative rate) makes every epoch worse, on validation too: epoch 0 is delivered.
    res = run_pipeline(_tiny_run(tmp_path, cli_cache, learning_rate=-0.01, step_learning_rate=-0.1))
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))  # logging.tensorboard is off by default
    sel = res["bptt_selection"]
    assert len(sel["val_loss"]) == 3 and all(v > sel["val_loss"][0] for v in sel["val_loss"][1:]), sel
    assert sel["kept_epoch"] == 0
    # The delivered model is the pretrained one at the validation split's best constant step.
    eta0 = res["step_size_initial"]
    assert eta0 == float(min(res["validation_step_grid"], key=res["validation_step_grid"].get))
    assert res["avg_dq"]["bptt"] == pytest.approx(res["constant_step_grid"][str(eta0)], rel=1e-6)
    assert res["step_size_final"] == pytest.approx(eta0)
    assert (res["n_train"], res["n_val"], res["n_test"]) == (5, 1, 4)
    rows = json.loads((Path(tmp_path) / "run" / "results.json").read_text())["bptt_selection"]
    assert rows == json.loads(json.dumps(sel))


@pytest.mark.slow
def test_fine_tuning_keeps_the_best_validation_epoch(tmp_path, cli_cache):
    """... and, with logging.tensorboard=true, writes its curves: metrics.csv's rows and results.json's figures. The
    same seed again (one device; tests/test_train.py repeats the CLI run on two): the same results.json but for
    wall times, and the same parameters, bit for bit."""
    cfg = _tiny_run(tmp_path, cli_cache, learning_rate=1e-3)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, fire=True))
    res = run_pipeline(dataclasses.replace(cfg, logging=LoggingConfig(tensorboard=True)))
    run_pipeline(dataclasses.replace(cfg, run_dir=str(tmp_path / "again")))
    untimed = lambda d: {k: v for k, v in d.items() if k not in ("wall_s", "seconds_per_bptt_step")}  # noqa: E731
    assert untimed(json.loads((tmp_path / "again" / "results.json").read_text())) == untimed(
        json.loads((Path(cfg.run_dir) / "results.json").read_text()))
    from bptt_jax import load_run

    for checkpoint in ("pretrained", 1, 2):
        _tree_equal(load_run(tmp_path / "again", checkpoint).params, load_run(cfg.run_dir, checkpoint).params)
    sel = res["bptt_selection"]
    assert sel["kept_epoch"] == int(np.argmin(sel["val_loss"]))
    _curves_are_the_run(Path(cfg.run_dir), res)
    assert res["pretrain_stop"] == "max_epochs" and res["pretrain_epochs"] == 2
    # experiments.fire_divergence on this run: its FIRE with the pretrained model is the pipeline's FIRE
    # baseline, and it relaxes the same structures with the generating potential (Tersoff) too.
    from experiments.fire_divergence import analyse, report
    diag = analyse(Path(cfg.run_dir))
    assert diag["n"] == res["n_test"] == len(diag["exact"])
    assert np.mean([r["loss"] for r in diag["model"]]) == pytest.approx(res["avg_dq"]["fire"], rel=1e-5)
    assert all(0 < r["frames"] <= 8 for r in diag["exact"])
    text = report(diag, "cmd", 1.0)
    assert "| exact (generating potential) |" in text and f"({res['n_test']} test structures)" in text


def _tree_equal(a, b) -> None:
    """Every leaf of ``a`` equals ``b``'s exactly."""
    import jax

    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _curves_are_the_run(run_dir: Path, res: dict) -> None:
    """The run's TensorBoard scalars, each (tag, step) written once, are its metrics.csv rows at their epochs (BPTT's
    epoch 0: the starting model), its training steps (their mean: the epoch's train_loss) and results.json's
    headline figures at the last epoch."""
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    value = {(tag, step): v for tag, points in scalars.items() for step, v in points}
    assert len(value) == sum(len(points) for points in scalars.values())
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    expected = {(f"{r['stage']}/{col}", int(r["epoch"])): float(text) for r in rows for col, text in r.items()
                if col not in ("stage", "epoch", "stop") and text != ""}
    sel, epochs = res["bptt_selection"], len(res["bptt_selection"]["train_loss"])
    expected.update({("bptt/val_loss", 0): sel["val_loss"][0], ("bptt/test_loss", 0): sel["test_loss_start"],
                     ("bptt/step_size", 0): res["step_size_initial"]})
    expected.update({(f"results/avg_dq/{k}", epochs): v for k, v in res["avg_dq"].items() if v is not None})
    expected.update({(f"results/{k}", epochs): res[k] for k in ("reduction_pct", "reduction_vs_fire_pct",
                                                               "step_size_final")})
    assert {k: v for k, v in value.items() if not k[0].startswith("bptt_step/")} == pytest.approx(expected, rel=1e-6)
    assert {"train_loss", "test_loss", "val_loss", "step_size", "seconds"} <= {
        tag.split("/")[1] for tag, step in expected if tag.startswith("bptt/") and step == epochs}
    assert {tag for tag, _ in expected if tag.startswith("pretrain/")} >= {"pretrain/train_force_mse",
                                                                          "pretrain/val_force_mse", "pretrain/lr"}
    losses = [v for _, v in scalars["bptt_step/loss"]]
    assert [s for s, _ in scalars["bptt_step/loss"]] == list(range(1, len(losses) + 1)) and len(losses) % epochs == 0
    assert set(scalars) - {tag for tag, _ in expected} == {"bptt_step/loss", "bptt_step/frames", "bptt_step/diverged"}
    np.testing.assert_allclose(np.mean(np.reshape(losses, (epochs, -1)), axis=1), sel["train_loss"], rtol=1e-5)


def test_pretraining_stops_on_a_plateau_not_the_clock(tmp_path, cli_cache):
    from bptt_jax.pipeline import force_items, pretrain
    cfg = _tiny_run(tmp_path, cli_cache)
    parts = load_split(cfg.data, SkipLog(), progress=False)
    frames = force_items(parts.train, 1)
    model = build_model("adapt", "tiny")
    import jax
    from bptt_jax.structures import Batch
    params = model.init(jax.random.PRNGKey(0), Batch.from_structures(frames[:2]))
    # min_delta so large that no epoch counts as an improvement: stops after `patience` epochs, whatever the time.
    pcfg = dataclasses.replace(cfg.pretrain, max_epochs=10, patience=2, min_delta=0.99, schedule="plateau")
    _, history = pretrain(model, params, frames, pcfg, cfg.data.buckets, 0, progress=False)
    assert len(history) == 3 and history[-1]["stop"] == "plateau"
    with pytest.raises(ValueError, match="schedule"):
        PretrainConfig(schedule="linear")


@pytest.mark.slow
def test_ablation_options_run_through_the_pipeline(tmp_path, cli_cache):
    """Fig. 5a's frozen MLIP with App. B's randomly initialised step head, trained under App. C.1's noise, C.4's
    variable stop and C.2's proximal term without clipping: the MLIP comes out bit for bit as pretrained, the
    noise anneals per epoch, and the evaluation relaxations are the noise-free ones."""
    head = {"output_init": "random", "d_model": 8, "n_heads": 2, "ffn_dim": 8}
    cfg = _tiny_run(tmp_path, cli_cache, dict(step_mode="network", step_head=head), learning_rate=1e-3,
                    freeze_model=True, noise=0.02, noise_anneal=0.5, variable_stop=True, stop_frames_range=(4, 8),
                    clip_norm=None, prox_weight=0.1)
    res = run_pipeline(cfg)
    assert res["force_l2"]["bptt"] == res["force_l2"]["pretrained"]  # frozen: the same forces exactly
    assert res["finetune"]["freeze_model"] and res["finetune"]["clip_norm"] is None
    saved = RunConfig.from_dict(json.loads((Path(cfg.run_dir) / "run_config.json").read_text()))
    assert saved.relax == cfg.relax and dict(saved.relax.step_head)["output_init"] == "random"
    rows = [r for r in csv.DictReader(open(Path(cfg.run_dir) / "metrics.csv")) if r["stage"] == "bptt"]
    assert [float(r["noise"]) for r in rows] == pytest.approx([0.02, 0.01])
    # The baselines are those of the same run without any of the training-only options.
    plain = run_pipeline(dataclasses.replace(cfg, run_dir=str(tmp_path / "plain"),
                                             finetune=FinetuneConfig(epochs=0)))
    assert res["constant_step_grid"] == plain["constant_step_grid"]
    with pytest.raises(ValueError, match="finetune.noise"):
        run_pipeline(dataclasses.replace(cfg, relax=RelaxConfig(max_frames=8, noise=0.01)))


def test_a_loaded_run_rebuilds_its_starting_step_head(tmp_path):
    """Epoch 0 of a run whose step head starts from random weights (``output_init=random``) is what fine_tune
    started from: load_run draws the head from the run's seed as fine_tune does, on a batch of other shapes."""
    import jax

    from bptt_jax import load_run
    from bptt_jax.pipeline import make_bptt, pretrained_dir, save_checkpoint
    from bptt_jax.pipeline.finetuning import starting_params
    from bptt_jax.pipeline.report import jsonable
    from bptt_jax.structures import Batch

    cfg = _tiny_run(tmp_path, tmp_path, relax={"step_mode": "network",
                                               "step_head": (("output_init", "random"), ("d_model", 8))})
    cfg = dataclasses.replace(cfg, seed=7)
    model = cfg.model.build()
    start, _ = rattled_si(cubic=True)
    sample = Batch.from_structures([start], n_atoms=16)
    variables = model.init(jax.random.PRNGKey(1), sample)
    run_dir = Path(cfg.run_dir)
    save_checkpoint(pretrained_dir(run_dir), 0, variables, {"history": []})
    (run_dir / "run_config.json").write_text(json.dumps(jsonable(cfg)))
    (run_dir / "results.json").write_text(json.dumps({"step_size_initial": 0.02, "elements": [14],
                                                      "bptt_selection": {"kept_epoch": 0}}))
    started = starting_params(make_bptt(cfg, model, 0.02, 1), variables, jax.random.PRNGKey(7), sample)
    loaded = load_run(run_dir)
    assert loaded.epoch == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, started)
    other = starting_params(make_bptt(cfg, model, 0.02, 1), variables, jax.random.PRNGKey(0), sample)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(loaded.params["step_head"]),
                                                        jax.tree_util.tree_leaves(other["step_head"])))
