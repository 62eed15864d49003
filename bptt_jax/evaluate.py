"""``python -m bptt_jax.evaluate RUN_DIR [OVERRIDES...]``: a saved run's model, evaluated as training evaluates it.

    python -m bptt_jax.evaluate runs/X                                  # the run's own test split again
    python -m bptt_jax.evaluate runs/X +dataset=catalysts               # another data set
    python -m bptt_jax.evaluate runs/X dataset.path=my_trajs/ dataset.name=mine
    python -m bptt_jax.evaluate runs/X eval.fire=false --checkpoint pretrained -o evals/pre

The pipeline's evaluation stages on the data set the overrides describe: the constant-step grid (its best on
the test split is reported, as in training), FIRE, the oracle where the data are generated, and the run's
tuned relaxation (its model, learned step or step head and update rule); Avg Dq (or MSE), ADwT, force errors,
diverged and basin counts. The output directory gets the same ``results.json``, ``results.md`` (the markdown
table training prints), ``per_structure.png`` and ``displacement_errors.png`` as a training run, beside the
evaluation's ``run_config.json``; ``results.json``'s ``evaluated`` records the run, checkpoint and overrides.

Overrides are Hydra's, composed with ``conf/`` as ``python -m bptt_jax.train`` composes them, and applied to the
run's own settings: ``+dataset=NAME`` replaces the data set, ``dataset.KEY=...`` and ``eval.KEY=...`` change one
setting, ``relax.tol`` / ``relax.max_frames`` / ``relax.diverge_distance`` the stop rule of every relaxation (a
new data set brings its own frame budget, ``dataset.max_frames``), and ``seed``, ``progress``, ``plots``,
``cpu_devices``, ``xla_flags``, ``compile_cache_dir`` as in training (the XLA settings default to the run's own,
which decide the last bits of float32 results). The model and its relaxation are the run's: other keys are
refused. Without overrides, the run's own test split is evaluated again and its ``results.json`` figures are
reproduced.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

log = logging.getLogger("bptt_jax")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STOP_KEYS = ("tol", "max_frames", "diverge_distance")
RUNTIME_KEYS = ("seed", "progress", "plots", "cpu_devices", "xla_flags", "compile_cache_dir")


def override_keys(overrides: Sequence[str]) -> tuple[bool, set[str]]:
    """(whether ``+dataset=NAME`` or ``dataset=NAME`` selects a data set, the dotted keys set); a one-line
    ``ValueError`` for a key evaluation does not take."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ValueError(f"bad override: {str(err).splitlines()[0]}") from None
    group, keys = False, set()
    for o in parsed:
        key = o.key_or_group
        if key == "dataset":
            group = True
        elif (key.startswith(("dataset.", "eval.")) or key in RUNTIME_KEYS
              or key in tuple(f"relax.{k}" for k in STOP_KEYS)):
            keys.add(key)
        else:
            raise ValueError(f"{o.input_line}: evaluate keeps the run's model and relaxation; it takes +dataset=NAME, "
                             f"dataset.*, eval.*, relax.{{{','.join(STOP_KEYS)}}} and {', '.join(RUNTIME_KEYS)}")
    return group, keys


def compose(overrides: Sequence[str]):
    """The Hydra config ``python -m bptt_jax.train OVERRIDES`` would run with (``conf/``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def evaluation_config(run_config, composed, group: bool, keys: set[str], out_dir: Union[str, Path]):
    """The run's configuration with the overridden data set, evaluation, stop rule and runtime settings taken from
    ``composed`` (:func:`compose`): a selected data set as a whole, every other key one by one."""
    from omegaconf import OmegaConf

    from bptt_jax.pipeline.config import RunConfig
    from bptt_jax.pipeline.report import jsonable

    c: dict[str, Any] = OmegaConf.to_container(composed, resolve=True)  # type: ignore[assignment]
    layout = jsonable(run_config)
    layout["data"]["max_frames"] = layout["relax"]["max_frames"]
    if group:
        layout["data"] = dict(c["dataset"])
    for key in sorted(keys):
        node, _, leaf = key.rpartition(".")
        target = {"dataset": layout["data"], "eval": layout["eval"], "relax": layout["relax"], "": layout}[node]
        value = OmegaConf.select(composed, key)
        target[leaf] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    frames = layout["data"].pop("max_frames")
    if (group or "dataset.max_frames" in keys) and "relax.max_frames" not in keys:
        layout["relax"]["max_frames"] = frames  # a data set's frame budget, as relax.max_frames: ${dataset.max_frames}
    for key in ("cpu_devices", "xla_flags", "compile_cache_dir"):
        layout.pop(key, None)
    layout.update(run_dir=str(out_dir), resume=False)
    return RunConfig.from_dict(layout)


def default_out_dir(run_dir: Path, checkpoint, overrides: Sequence[str]) -> Path:
    """``RUN_DIR/evaluations/<checkpoint>[_<overrides>]`` (a hash when the overrides make too long a name)."""
    name = str(checkpoint)
    if overrides:
        label = re.sub(r"[^A-Za-z0-9=.,_+-]+", "-", "_".join(overrides))
        name += "_" + (label if len(label) <= 80 else hashlib.sha256(label.encode()).hexdigest()[:12])
    return run_dir / "evaluations" / name


def evaluate_run(run_dir: Union[str, Path], overrides: Sequence[str] = (), out_dir: Optional[Union[str, Path]] = None,
                 checkpoint: Union[str, int] = "final", composed=None) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` (see the module docstring) and write the results; returns ``results.json``'s
    dictionary. ``composed``: the Hydra config of ``overrides`` when the caller already composed it."""
    import jax

    from bptt_jax.load import read_json, load_run
    from bptt_jax.pipeline import report
    from bptt_jax.pipeline.data import load_data
    from bptt_jax.pipeline.evaluate import Evaluator, baselines, evaluate_tuned
    from bptt_jax.pipeline.finetuning import Tuned
    from bptt_jax.pipeline.pretraining import Pretrained

    run_dir = Path(run_dir)
    group, keys = override_keys(overrides)
    composed = compose(overrides) if composed is None else composed
    run = load_run(run_dir, checkpoint)
    trained = read_json(run_dir / "results.json", "results.json")
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dir, checkpoint, overrides)
    cfg = evaluation_config(run.config, composed, group, keys, out)
    cfg.validate()
    model = run.model
    t = time.time()
    data = load_data(cfg, getattr(model, "max_atoms", None))
    unseen = {int(z) for s, _ in data.test_items for z in s.numbers} - set(run.elements or ())
    if run.elements is not None and unseen:
        log.warning("the test split has element(s) %s the run never trained on: expect poor forces",
                    sorted(unseen))
    pre_params = run.pretrained
    ev = Evaluator.create(cfg, model, data, jax.random.PRNGKey(cfg.seed))
    base = baselines(cfg, model, ev, pre_params)
    bptt = dataclasses.replace(run.bptt, relax=dataclasses.replace(
        run.bptt.relax, **{k: getattr(cfg.relax, k) for k in STOP_KEYS}))
    final = evaluate_tuned(ev, bptt, run.params, pre_params)
    tuned = Tuned(bptt, run.params, [], run.epoch, None, None, trained.get("step_size_initial"), 0, 0.0)
    results = report.build_results(cfg, data, Pretrained(pre_params, [], 0.0), base, tuned, final, None)
    # What the evaluation did not do (train) is the run's: its selection, pretraining and training figures.
    for key in ("bptt_selection", "pretrain_epochs", "pretrain_stop", "seconds_per_bptt_step", "finetune",
                "elements"):
        results[key] = trained.get(key)
    if checkpoint != "final":
        results["bptt_selection"] = dict(results["bptt_selection"] or {}, kept_epoch=run.epoch)
    results["wall_s"] = {"data": round(data.seconds, 2), "baselines": round(base.seconds, 2),
                         "evaluate": round(final.seconds, 2), "total": round(time.time() - t, 2)}
    results["evaluated"] = {"run": str(run_dir), "checkpoint": checkpoint, "epoch": run.epoch,
                            "overrides": list(overrides)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(json.dumps(report.jsonable(cfg), indent=1))
    report.write_run(cfg, out, results, [], [], metrics=False)
    (out / "results.md").write_text(report.markdown_table(results) + "\n")
    report.write_error_picture(cfg, out, data.test_items, base.constant_step, final.tuned, base.best_step)
    return results


def run_runtime(composed, run_dir: Path, keys: set[str]) -> None:
    """The run's own XLA settings (``cpu_devices``, ``xla_flags``, from its ``config_resolved.yaml``) in ``composed``
    unless overridden: they decide the last bits of float32 results, so the run's figures are reproduced exactly."""
    from omegaconf import OmegaConf

    saved = run_dir / "config_resolved.yaml"
    if not saved.exists():  # a run made through the Python API: this process's defaults
        return
    run = OmegaConf.load(saved)
    for key in ("cpu_devices", "xla_flags"):
        if key not in keys and key in run:
            OmegaConf.update(composed, key, run[key], merge=False)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bptt_jax.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run directory of python -m bptt_jax.train")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides: +dataset=NAME, dataset.KEY=..., eval.KEY=..., ...")
    ap.add_argument("-o", "--output", type=Path, default=None,
                    help="output directory (default RUN/evaluations/<checkpoint>[_<overrides>])")
    ap.add_argument("--checkpoint", default="final", help="final (default), pretrained, or a BPTT epoch number")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bptt_jax.load import read_json

    checkpoint = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
    try:
        read_json(args.run / "run_config.json", "run_config.json")  # a run directory, before anything is set up
        _, keys = override_keys(args.overrides)
        composed = compose(args.overrides)
    except Exception as err:  # noqa: BLE001 (Hydra raises several types for a bad override)
        log.error("%s", str(err).splitlines()[0] if str(err) else type(err).__name__)
        return 2
    run_runtime(composed, args.run, keys)
    from bptt_jax.runtime import add_xla_flags, enable_compile_cache
    from bptt_jax.train import runtime_settings

    flags, cache_dir = runtime_settings(composed)
    add_xla_flags(flags)  # before the first JAX computation, as training does
    if cache_dir:
        enable_compile_cache(cache_dir)
    try:
        results = evaluate_run(args.run, args.overrides, args.output, checkpoint, composed)
    except (ValueError, OSError, RuntimeError) as err:
        log.error("%s", str(err).splitlines()[0] if str(err) else type(err).__name__)
        return 2
    from bptt_jax.pipeline.report import markdown_table

    print()
    print(markdown_table(results))
    out = args.output or default_out_dir(args.run, checkpoint, args.overrides)
    print(f"\nevaluation directory: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
