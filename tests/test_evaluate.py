"""python -m bptt_jax.evaluate: which settings an evaluation takes from the run and which from the overrides.
(The evaluation itself, reproducing a run's results.json, is in test_train's end-to-end run.)"""

import dataclasses
import json

import pytest

from bptt_jax.evaluate import compose, default_out_dir, evaluation_config, main, override_keys
from bptt_jax.pipeline.config import DataConfig, EvalConfig, ModelConfig, RunConfig
from bptt_jax.pipeline.report import jsonable
from bptt_jax.relax import RelaxConfig

RUN = RunConfig(data=DataConfig(preset="tiny", n=10, n_test=4, cache_dir="/tmp/cache"),
                model=ModelConfig(preset="tiny"), relax=RelaxConfig(max_frames=8, step_size=None, step_mode="network",
                                                                    step_head=(("d_model", 8),)),
                eval=EvalConfig(step_grid=(0.01, 0.05), fire=True, oracle=False), seed=3, run_dir="runs/X")


def _config(*overrides):
    group, keys = override_keys(overrides)
    return evaluation_config(RUN, compose(overrides), group, keys, "out")


def test_without_overrides_the_run_is_evaluated_as_it_was():
    cfg = _config()
    assert cfg == dataclasses.replace(RUN, run_dir="out", resume=False)


def test_one_key_changes_one_setting_of_the_run():
    cfg = _config("dataset.n_test=2", "eval.fire=false", "relax.tol=0.01", "seed=5")
    assert cfg.data == dataclasses.replace(RUN.data, n_test=2)  # the rest of the run's data set, not the default's
    assert cfg.eval == dataclasses.replace(RUN.eval, fire=False)  # the run's step grid stays
    assert cfg.relax == dataclasses.replace(RUN.relax, tol=0.01) and cfg.seed == 5
    assert cfg.model == RUN.model and cfg.finetune == RUN.finetune


def test_a_new_data_set_brings_its_frame_budget():
    cfg = _config("+dataset=catalysts")
    assert (cfg.data.name, cfg.data.n_test, cfg.relax.max_frames) == ("catalysts", 100, 200)
    assert cfg.relax == dataclasses.replace(RUN.relax, max_frames=200)  # the run's relaxation otherwise
    assert _config("+dataset=catalysts", "relax.max_frames=30").relax.max_frames == 30
    assert _config("dataset.max_frames=12").relax.max_frames == 12
    cfg = _config("dataset.path=/data/my.extxyz", "dataset.name=mine")
    assert (cfg.data.path, cfg.data.name, cfg.data.preset) == ("/data/my.extxyz", "mine", "tiny")


@pytest.mark.parametrize("override", ["model.preset=small", "finetune.epochs=3", "relax.step_mode=fixed",
                                      "relax.rule=fire", "pretrain.max_epochs=1"])
def test_the_model_and_its_relaxation_are_the_runs(override):
    with pytest.raises(ValueError) as err:
        override_keys([override])
    assert str(err.value).startswith(override) and "\n" not in str(err.value)


def test_cli_errors_are_one_line_before_any_work(tmp_path, caplog):
    assert main([str(tmp_path / "missing"), "eval.fire=false"]) == 2
    assert "run_config.json" in caplog.text
    caplog.clear()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(jsonable(RUN)))
    assert main([str(run), "model.preset=small"]) == 2 and "model.preset=small" in caplog.text
    assert main([str(run), "dataset.nope=1"]) == 2  # Hydra: not in the config
    assert main([str(run), "+dataset=nope"]) == 2
    assert not (run / "evaluations").exists()


def test_default_output_directory():
    assert default_out_dir(__import__("pathlib").Path("r"), "final", []).as_posix() == "r/evaluations/final"
    assert default_out_dir(__import__("pathlib").Path("r"), 2, ["+dataset=catalysts", "eval.fire=false"]).as_posix() \
        == "r/evaluations/2_+dataset=catalysts_eval.fire=false"
