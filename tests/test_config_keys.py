"""Every key of the composed default config (``conf/config.yaml`` with its model group) has one home: changing it
changes the library config it is meant to change, and every setting of the typed config tree has a key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from bptt_jax.bptt import make_step
from bptt_jax.parallel import DistributedConfig
from bptt_jax.pipeline import (DataConfig, EvalConfig, FinetuneConfig, LoggingConfig, ModelConfig, PretrainConfig,
                               RunConfig)
from bptt_jax.pipeline.finetuning import make_bptt
from bptt_jax.relax import RelaxConfig
from bptt_jax.train import config_from_hydra, runtime_settings

ROOT = Path(__file__).resolve().parents[1]

# A valid other value for each key whose generic change (bool flipped, int + 1, float halved) does not apply,
# and the settings under which the key matters (a gradient method's option needs that method).
OTHER = {
    "dataset.name": "catalysts", "dataset.path": "my_trajs.xyz", "dataset.format": "ase", "dataset.preset": "tiny",
    "dataset.n": 10, "dataset.generator": {"repeat": 3}, "dataset.cache_dir": "elsewhere", "dataset.loss": "mse",
    "dataset.max_train": 5, "dataset.buckets": [8, 16, 64],
    "model.name": "resmlp", "model.preset": "tiny", "model.overrides": {"d_model": 32}, "model.init_from": "runs/x",
    "model.matmul_dtype": "bfloat16",
    "relax.rule": "fire", "relax.step_mode": "fixed", "relax.step_size": 0.05, "relax.step_head": {"d_model": 32},
    "relax.grad_mode": "remat", "relax.window": 5, "relax.remat_segment": 0, "relax.adjoint_solver": "neumann",
    "relax.adjoint_unconverged": "solve", "relax.length_quantum": 8,
    "pretrain.schedule": "plateau", "pretrain.patience": 3, "pretrain.time_budget_s": 60.0,
    "pretrain.checkpoint_every": 5,
    "finetune.clip_norm": None, "finetune.schedule": "cosine", "finetune.stop_tol_range": [1e-3, 1e-2],
    "finetune.stop_frames_range": [40, 60],
    "eval.step_grid": [0.01, 0.02],
    "distributed.coordinator_address": "host:1234", "distributed.num_processes": 2, "distributed.process_id": 1,
    "distributed.local_device_ids": [0], "distributed.cpu_collectives": "mpi",
    "xla_flags": [], "compile_cache_dir": "/tmp/xla_cache", "logging.dir": "tb",
}
CONTEXT = {
    "model.name": {"model.preset": "tiny"},
    "relax.step_head": {"relax.step_mode": "network"},
    "relax.window": {"relax.grad_mode": "truncated"}, "relax.remat_segment": {"relax.grad_mode": "remat"},
    "relax.sample_frames": {"relax.grad_mode": "first_order"}, "relax.sample_chunk": {"relax.grad_mode": "first_order"},
    **{f"relax.adjoint_{k}": {"relax.grad_mode": "implicit"}
       for k in ("solver", "iters", "tol", "damping", "project_translations", "unconverged")},
    "finetune.stop_tol_range": {"finetune.variable_stop": True},
    "finetune.stop_frames_range": {"finetune.variable_stop": True},
    "finetune.noise_anneal": {"finetune.noise": 0.01},
    "finetune.final_lr_fraction": {"finetune.schedule": "cosine"},
}
# Keys that change the optimiser of the BPTT trainer (everything else of `finetune` is the stage's own loop).
OPTIMISER = {"dataset.loss"} | {f"finetune.{k}" for k in (
    "learning_rate", "clip_norm", "prox_weight", "freeze_model", "noise", "noise_anneal", "variable_stop",
    "stop_tol_range", "stop_frames_range", "warmup_steps", "schedule", "final_lr_fraction", "step_learning_rate")}
# Settings of the typed tree without a key, and why.
NO_KEY = {
    "RelaxConfig.noise": "exploration noise in every relaxation, baselines included: the pipeline refuses it "
                         "(training noise is finetune.noise)",
    "RelaxConfig.noise_anneal": "its per-frame factor, the same (finetune.noise_frame_anneal for training noise)",
    "RelaxConfig.fire": "FIRE's constants (library only)",
    "RunConfig.run_dir": "hydra.run.dir", "RunConfig.resume": "train.resume",
    "RunConfig.data": "dataset",
}


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _leaves(node, prefix=""):
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def _other(key, value):
    if key in OTHER:
        return OTHER[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.01
    raise AssertionError(f"{key}={value!r}: add another valid value to OTHER")


def _set(cfg, key, value):
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def _optimiser(optim):
    """The optimiser's settings, with its schedules (learning rate, noise) as values over 60 steps."""
    out = {}
    for f in dataclasses.fields(optim):
        v = getattr(optim, f.name)
        out[f.name] = tuple(float(v(s)) for s in range(0, 60, 3)) if callable(v) else v
    return out


def _views(cfg) -> dict:
    """What each part of the config builds: the BPTT trainer's relaxation (and step size) and optimiser, the stages'
    own configs, and the process's runtime settings."""
    run = config_from_hydra(cfg, "/tmp/x")
    run.validate()
    bptt = make_bptt(run, run.model.build(), 0.03 if run.relax.step_size is None else run.relax.step_size,
                     steps_per_epoch=10)
    return {"trainer relaxation": (bptt.relax, make_step(bptt.relax)), "trainer optimiser": _optimiser(bptt.optim),
            "dataset": run.data, "model": (run.model, run.model.build()), "pretrain": run.pretrain,
            "finetune": run.finetune, "eval": run.eval, "distributed": run.distributed,
            "train": run.resume, "seed": run.seed, "progress": run.progress, "plots": run.plots,
            "logging": run.logging, "runtime": runtime_settings(cfg)}


def _target(key: str) -> str:
    if key in OPTIMISER:
        return "trainer optimiser"
    if key.startswith("relax.") or key in ("dataset.max_frames", "finetune.noise_frame_anneal"):
        return "trainer relaxation"
    if key in ("xla_flags", "cpu_devices", "compile_cache_dir"):
        return "runtime"
    return key.split(".")[0]


DEFAULT_KEYS = [k for k, _ in _leaves(OmegaConf.to_container(_compose(), resolve=False))]


@pytest.mark.parametrize("key", DEFAULT_KEYS)
def test_each_key_changes_what_it_is_meant_to(key):
    cfg = _compose()
    for k, v in CONTEXT.get(key, {}).items():
        _set(cfg, k, v)
    before = _views(cfg)
    _set(cfg, key, _other(key, OmegaConf.select(cfg, key)))
    after = _views(cfg)
    target = _target(key)
    assert after[target] != before[target], f"{key} does not change the {target}"


def test_the_relaxation_trained_through_is_relax():
    """The keys that used to be copied between configs, or silently overridden, reach the trainer."""
    cfg = _compose(["relax.rule=fire", "+dataset=catalysts", "relax.step_size=0.04", "relax.step_mode=network",
                    "+relax.step_head.output_init=random"])
    run = config_from_hydra(cfg, "/tmp/x")
    bptt = make_bptt(run, run.model.build(), 0.04, steps_per_epoch=10)
    assert (bptt.relax.rule, bptt.relax.max_frames, bptt.relax.step_size) == ("fire", 200, 0.04)
    assert dict(bptt.relax.step_head) == {"output_init": "random"}
    network = make_bptt(dataclasses.replace(run, relax=dataclasses.replace(run.relax, rule="descent")),
                        run.model.build(), 0.04, steps_per_epoch=10)
    assert network.step.head.output_init == "random" and network.step.head.init_step == 0.04
    # relax.max_frames set directly wins over the data set's budget
    assert config_from_hydra(_compose(["+dataset=catalysts", "relax.max_frames=50"]), "/tmp/x").relax.max_frames == 50


@pytest.mark.parametrize("key", ["relax.remat", "finetune.rule", "finetune.step_mode", "finetune.step_size"])
def test_removed_aliases_are_refused(key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose([f"{key}=fixed"])


def test_every_setting_of_the_typed_tree_has_a_key():
    keys = set(DEFAULT_KEYS)
    node = {"DataConfig": "dataset", "ModelConfig": "model", "RelaxConfig": "relax", "PretrainConfig": "pretrain",
            "FinetuneConfig": "finetune", "EvalConfig": "eval", "DistributedConfig": "distributed",
            "LoggingConfig": "logging", "RunConfig": ""}
    missing = []
    for cls in (DataConfig, ModelConfig, RelaxConfig, PretrainConfig, FinetuneConfig, EvalConfig, DistributedConfig,
                LoggingConfig, RunConfig):
        for f in dataclasses.fields(cls):
            key = f"{node[cls.__name__]}.{f.name}".lstrip(".")
            if key not in keys and not any(k.startswith(key + ".") for k in keys) \
                    and f"{cls.__name__}.{f.name}" not in NO_KEY:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"settings without a key in conf/: {missing}"


def test_old_run_configs_load():
    """A run_config.json written before each setting had one home reads into the same tree."""
    old = {"data": {"name": "si_defects", "max_frames": 200, "buckets": [16, 32]},
           "relax": {"rule": "descent", "step_size": 0.077, "step_mode": "fixed", "remat": True, "fire": []},
           "finetune": {"rule": "fire", "step_mode": "network", "step_size": 0.05, "step_head": {"d_model": 8},
                        "epochs": 3},
           "eval": {"step_grid": [0.01, 0.1]}, "seed": 2}
    run = RunConfig.from_dict(old)
    assert run.relax == RelaxConfig(rule="fire", step_size=0.05, step_mode="network", step_head=(("d_model", 8),),
                                    max_frames=200, grad_mode="remat", remat_segment=1)
    assert run.data.buckets == (16, 32) and run.finetune.epochs == 3 and run.eval.step_grid == (0.01, 0.1)
    assert run.seed == 2 and run.logging == LoggingConfig()  # written before the logging node: off


# Settings no run can use: each is refused before anything is computed, in one line naming the key.
BAD = [
    (["dataset.name=nonesuch"], "dataset.name"),
    (["dataset.preset=huge"], "dataset.preset"),
    (["dataset.path=x.csv", "dataset.format=csv"], "dataset.format"),
    (["dataset.n=0"], "dataset.n"),
    (["dataset.n_test=0"], "dataset.n_test"),
    (["dataset.max_train=-1"], "dataset.max_train"),
    (["dataset.workers=0"], "dataset.workers"),
    (["dataset.loss=mae"], "dataset.loss"),
    (["dataset.buckets=[]"], "dataset.buckets"),
    (["dataset.buckets=[0,8]"], "dataset.buckets"),
    (["+dataset.typo=1"], "typo"),
    (["dataset.max_frames=0"], "dataset.max_frames"),
    (["relax.step_size=-1"], "relax.step_size"),
    (["relax.step_size=0"], "relax.step_size"),
    (["relax.step_size=nan"], "relax.step_size"),
    (["relax.step_size=abc"], "relax.step_size"),
    (["relax.tol=nan"], "relax.tol"),
    (["relax.tol=-1e-3"], "relax.tol"),
    (["relax.momentum=1.5"], "relax.momentum"),
    (["relax.anneal=0"], "relax.anneal"),
    (["relax.diverge_distance=-5"], "relax.diverge_distance"),
    (["relax.max_frames=abc"], "relax.max_frames"),
    (["relax.grad_mode=truncated", "relax.window=-3"], "relax.window"),
    (["relax.grad_mode=implicit", "relax.adjoint_iters=0"], "relax.adjoint_iters"),
    (["eval.step_grid=[0.01,-0.05]"], "eval.step_grid"),
    (["eval.step_grid=[0.01,0]"], "eval.step_grid"),
    (["eval.step_grid=[0.01,nan]"], "eval.step_grid"),
    (["eval.step_grid=[]"], "eval.step_grid"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.basin_dq=0"], "eval.basin_dq"),
    (["pretrain.max_epochs=-1"], "pretrain.max_epochs"),
    (["pretrain.batch_size=0"], "pretrain.batch_size"),
    (["pretrain.learning_rate=-0.01"], "pretrain.learning_rate"),
    (["pretrain.learning_rate=0"], "pretrain.learning_rate"),
    (["pretrain.frame_stride=0"], "pretrain.frame_stride"),
    (["pretrain.val_fraction=1.0"], "pretrain.val_fraction"),
    (["finetune.epochs=-2"], "finetune.epochs"),
    (["finetune.batch_size=-8"], "finetune.batch_size"),
    (["finetune.learning_rate=-1"], "finetune.learning_rate"),
    (["finetune.learning_rate=inf"], "finetune.learning_rate"),
    (["finetune.step_learning_rate=-0.1"], "finetune.step_learning_rate"),
    (["finetune.clip_norm=0"], "finetune.clip_norm"),
    (["finetune.warmup_steps=-1"], "finetune.warmup_steps"),
    (["model.name=transformer"], "model.name"),
    (["model.preset=huge"], "model.preset"),
    (["model=resmlp", "+model.overrides.max_atoms=0"], "model.overrides.max_atoms"),
    (["+model.overrides.no_such_field=1"], "model.overrides"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_invalid_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ValueError) as info:
        config_from_hydra(_compose(overrides), "/tmp/x").validate()
    msg = str(info.value)
    assert "\n" not in msg and key in msg, msg


def test_buckets_key_reaches_the_data_config():
    assert config_from_hydra(_compose(), "/tmp/x").data.buckets == DataConfig().buckets  # null: the default sizes
    assert config_from_hydra(_compose(["dataset.buckets=[64,8,16]"]), "/tmp/x").data.buckets == (8, 16, 64)


def test_a_config_error_is_one_log_line_and_exit_2_before_any_data(tmp_path):
    """The CLI: `relax.step_size=-1` (issue 18: it used to run to the end without a word)."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "bptt_jax.train", "relax.step_size=-1", f"dataset.cache_dir={cache}",
                        f"hydra.run.dir={tmp_path / 'run'}", "progress=false"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "relax.step_size" in line]
    assert len(errors) == 1 and "-1" in errors[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not cache.exists()  # refused before the data set was generated
    assert not (tmp_path / "run" / "run_config.json").exists()
