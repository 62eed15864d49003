"""The run's configuration: one typed tree (:class:`RunConfig`) of the stages' settings, and its checks.

:mod:`bptt_jax.train` builds it from the Hydra config (``conf/``); nothing here imports Hydra or omegaconf.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Optional

from bptt_jax import parallel
from bptt_jax.models import build_model
from bptt_jax.relax import RelaxConfig
from bptt_jax.relax.config import is_count, is_number, require
from bptt_jax.structures import DEFAULT_BUCKETS


@dataclasses.dataclass
class DataConfig:
    """Where trajectories come from and how they are split and batched.

    ``path`` set: read any supported format (file or directory), at most ``n`` records. Otherwise the
    offline generator ``name`` with ``preset``/``n``/``seed`` writes (or reuses)
    ``cache_dir/<name>-<preset>-n<n>-s<seed>`` (``n`` None: the preset's size). The first ``n_test`` records
    are the test split, counted before anything is filtered (:func:`load_split`). The data set's frame budget
    (the Hydra key ``dataset.max_frames``) is the relaxation's: ``RelaxConfig.max_frames``.
    """

    name: str = "si_defects"
    path: Optional[str] = None
    format: Optional[str] = None
    preset: str = "default"
    n: Optional[int] = None
    seed: int = 0
    workers: int = 2
    cache_dir: str = "data"
    generator: dict = dataclasses.field(default_factory=dict)  # extra generator parameters
    strict: bool = False
    n_test: int = 100
    max_train: Optional[int] = None  # cap on training trajectories (None = all)
    buckets: Optional[tuple[int, ...]] = DEFAULT_BUCKETS  # None: DEFAULT_BUCKETS
    loss: str = "dq"  # dq (defects, catalysts) or mse (pure crystals): trained, reported, selected on

    def __post_init__(self):
        from bptt_jax.data.readers import FORMATS

        if self.path is None:
            from bptt_jax.data.generate import PARAMS, make_params

            require(self.name in PARAMS, "dataset.name", self.name,
                    f"a generator ({', '.join(sorted(PARAMS))}) unless dataset.path names your own files")
            try:
                make_params(self.name, self.preset, **dict(self.generator or {}))
            except (ValueError, TypeError) as err:
                raise ValueError(f"dataset.preset / dataset.generator: {err}") from None
        else:
            require(isinstance(self.path, str) and self.path != "", "dataset.path", self.path, "a file or directory")
        require(self.format is None or self.format in FORMATS, "dataset.format", self.format,
                f"null or one of {', '.join(FORMATS)}")
        require(self.n is None or is_count(self.n, 1), "dataset.n", self.n, "null or an integer of at least 1")
        require(is_count(self.n_test, 1), "dataset.n_test", self.n_test, "an integer of at least 1")
        require(self.max_train is None or is_count(self.max_train, 1), "dataset.max_train", self.max_train,
                "null or an integer of at least 1")
        require(is_count(self.workers, 1), "dataset.workers", self.workers, "an integer of at least 1")
        require(self.loss in ("dq", "mse"), "dataset.loss", self.loss, "dq or mse")
        if self.buckets is None:
            self.buckets = DEFAULT_BUCKETS
        require(isinstance(self.buckets, (list, tuple)) and len(self.buckets) > 0
                and all(is_count(b, 1) for b in self.buckets), "dataset.buckets", self.buckets,
                "a non-empty list of atom counts of at least 1 (null: the default sizes)")
        self.buckets = tuple(sorted({int(b) for b in self.buckets}))


@dataclasses.dataclass
class ModelConfig:
    name: str = "adapt"
    preset: Optional[str] = "small_geo"
    overrides: dict = dataclasses.field(default_factory=dict)
    init_from: Optional[str] = None  # a run directory or checkpoint directory with pretrained params
    matmul_dtype: str = "float32"  # float32 | bfloat16 (matrix products in bf16, float32 parameters; accelerators)

    def __post_init__(self):
        from bptt_jax.models import MODELS, PRESETS

        require(self.name in MODELS, "model.name", self.name, f"one of {', '.join(sorted(MODELS))}")
        require(self.preset is None or self.preset in PRESETS[self.name], "model.preset", self.preset,
                f"null or one of {', '.join(sorted(PRESETS[self.name]))} for {self.name}")
        require(self.matmul_dtype in ("float32", "bfloat16"), "model.matmul_dtype", self.matmul_dtype,
                "float32 or bfloat16")

    def build(self):
        """The Flax force model this names (:func:`bptt_jax.models.build_model`)."""
        kw = dict(self.overrides)
        if self.matmul_dtype != "float32":
            kw.setdefault("matmul_dtype", self.matmul_dtype)
        return build_model(self.name, self.preset, **kw)


@dataclasses.dataclass
class PretrainConfig:
    """Force matching on the flattened frames until the validation force error stops improving.

    The run stops after ``max_epochs``, or after ``patience`` epochs without a relative improvement of
    ``min_delta`` in the validation force MSE: the same command and seed give the same model on any machine.
    ``time_budget_s`` adds a wall-clock cap (off by default: a cap makes the model depend on the machine).
    ``patience=None`` turns the plateau stop off (every run trains ``max_epochs``)."""

    def __post_init__(self):
        if self.schedule not in ("plateau", "cosine"):
            raise ValueError(f"pretrain.schedule must be plateau or cosine, not {self.schedule!r}")
        require(is_count(self.max_epochs), "pretrain.max_epochs", self.max_epochs,
                "an integer of at least 0 (0: no force training)")
        require(self.patience is None or is_count(self.patience, 1), "pretrain.patience", self.patience,
                "null or an integer of at least 1")
        require(is_count(self.batch_size, 1), "pretrain.batch_size", self.batch_size, "an integer of at least 1")
        require(is_number(self.learning_rate, 0.0, above=True), "pretrain.learning_rate", self.learning_rate,
                "a positive number")
        require(is_number(self.min_learning_rate, 0.0, high=self.learning_rate), "pretrain.min_learning_rate",
                self.min_learning_rate, "between 0 and pretrain.learning_rate")
        require(is_number(self.clip_norm, 0.0, above=True), "pretrain.clip_norm", self.clip_norm, "a positive number")
        require(is_number(self.val_fraction, 0.0) and self.val_fraction < 1, "pretrain.val_fraction",
                self.val_fraction, "in [0, 1)")
        require(is_count(self.frame_stride, 1), "pretrain.frame_stride", self.frame_stride,
                "an integer of at least 1")
        require(is_number(self.min_delta, 0.0), "pretrain.min_delta", self.min_delta, "at least 0")
        require(self.time_budget_s is None or is_number(self.time_budget_s, 0.0, above=True),
                "pretrain.time_budget_s", self.time_budget_s, "null or a positive number of seconds")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"pretrain.checkpoint_every must be a positive number of steps or null, not "
                             f"{self.checkpoint_every!r}")

    max_epochs: int = 60
    patience: Optional[int] = 6
    batch_size: int = 32
    learning_rate: float = 2e-3
    min_learning_rate: float = 1e-5
    clip_norm: float = 10.0
    val_fraction: float = 0.1
    frame_stride: int = 3  # every k-th frame of each trajectory (neighbouring frames are nearly identical)
    min_delta: float = 1e-3  # an epoch improves when the validation MSE drops by more than this fraction
    schedule: str = "plateau"  # plateau: halve the rate when training stalls | cosine: decay over max_epochs
    time_budget_s: Optional[float] = None  # optional wall-clock cap (s); None: stop by epochs and plateau only
    # Pretraining's state is checkpointed at the end of every epoch, and every this many training steps within one
    # (None: at epoch ends only; set it when an epoch takes long).
    checkpoint_every: Optional[int] = None


@dataclasses.dataclass
class FinetuneConfig:
    """BPTT fine-tuning (paper Sec. 3, App. B-D): the optimiser, its schedule and the epochs. The relaxation
    trained through (rule, step size and its mode, stop rule, gradient method) is :attr:`RunConfig.relax`. The
    training-only options (``freeze_model``, ``noise``, ``variable_stop``) change the training rollouts, never
    the evaluation's."""

    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 5e-4
    clip_norm: Optional[float] = 1.0  # None: no clipping (proximal-only runs, App. C.2)
    prox_weight: float = 0.0
    freeze_model: bool = False  # train the step size only; the MLIP stays as pretrained (Fig. 5a)
    noise: float = 0.0  # σ (Å) of exploration noise in every training frame (App. C.1)
    noise_anneal: float = 1.0  # the noise's factor per epoch (epoch e: noise · noise_anneal^e)
    noise_frame_anneal: float = 1.0  # and per frame within a relaxation
    variable_stop: bool = False  # each training step draws its stop rule (App. C.4)
    stop_tol_range: tuple[float, float] = (1e-4, 1e-2)  # log-uniform
    stop_frames_range: tuple[int, int] = (50, 75)  # uniform, both included
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (decays to final_lr_fraction · learning_rate at the last step)
    final_lr_fraction: float = 0.05
    step_learning_rate: Optional[float] = 0.03  # Adam rate of log η: up to ~3% change of a learned η per step
    val_fraction: float = 0.15  # the last trajectories of the training split: BPTT's validation split

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"finetune.schedule must be constant or cosine, not {self.schedule!r}")
        require(is_count(self.epochs), "finetune.epochs", self.epochs, "an integer of at least 0")
        require(is_count(self.batch_size, 1), "finetune.batch_size", self.batch_size, "an integer of at least 1")
        # A negative rate is gradient ascent: refused from the CLI, kept in the library as a control (tests).
        require(is_number(self.learning_rate), "finetune.learning_rate", self.learning_rate, "a finite number")
        require(self.step_learning_rate is None or is_number(self.step_learning_rate), "finetune.step_learning_rate",
                self.step_learning_rate, "null or a finite number")
        require(self.clip_norm is None or is_number(self.clip_norm, 0.0, above=True), "finetune.clip_norm",
                self.clip_norm, "null or a positive number")
        require(is_number(self.prox_weight, 0.0), "finetune.prox_weight", self.prox_weight, "at least 0")
        require(is_count(self.warmup_steps), "finetune.warmup_steps", self.warmup_steps, "an integer of at least 0")
        require(is_number(self.final_lr_fraction, 0.0, high=1.0), "finetune.final_lr_fraction",
                self.final_lr_fraction, "in [0, 1]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"finetune.val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.noise < 0 or not 0 < self.noise_anneal <= 1 or not 0 < self.noise_frame_anneal <= 1:
            raise ValueError("finetune.noise must be >= 0 and its anneal factors in (0, 1]")
        self.stop_tol_range = tuple(float(x) for x in self.stop_tol_range)
        self.stop_frames_range = tuple(int(x) for x in self.stop_frames_range)


@dataclasses.dataclass
class EvalConfig:
    """Test-set evaluation and its controls.

    Attributes:
      step_grid: constant step sizes of the baseline (the best on the test set is reported, paper Table 7).
      fire: also relax the test set with FIRE and the pretrained model.
      batch_size: structures relaxed together.
      basin_dq: a relaxation ends in the reference's basin when its final Dq is below this (√amu·Å).
      force_control: continue force training for as many model evaluations as BPTT made, and report its
        best constant step beside BPTT (the equal-compute control).
      oracle: relax the test set with the generating potential's own forces under the same rule, step grid
        and frame budget (generated data sets only).
    """

    step_grid: tuple[float, ...] = (0.002, 0.003, 0.005, 0.007, 0.01, 0.02, 0.03, 0.05, 0.077, 0.1)
    fire: bool = True
    batch_size: int = 16
    basin_dq: float = 3.0
    force_control: bool = False
    oracle: bool = True

    def __post_init__(self):
        require(isinstance(self.step_grid, (list, tuple)) and len(self.step_grid) > 0
                and all(is_number(x, 0.0, above=True) for x in self.step_grid), "eval.step_grid", self.step_grid,
                "a non-empty list of positive step sizes (Å²/eV)")
        self.step_grid = tuple(float(x) for x in self.step_grid)
        require(is_count(self.batch_size, 1), "eval.batch_size", self.batch_size, "an integer of at least 1")
        require(is_number(self.basin_dq, 0.0, above=True), "eval.basin_dq", self.basin_dq, "a positive number")


@dataclasses.dataclass
class LoggingConfig:
    """Training curves for TensorBoard (:class:`~bptt_jax.pipeline.curves.TrainingCurves`).

    Attributes:
      tensorboard: write event files (tensorboardX, the extra ``tensorboard``): pretraining and BPTT per epoch,
        BPTT per training step, the headline results at the end.
      dir: where (relative paths: to the working directory); None: ``<run_dir>/tensorboard``.
    """

    tensorboard: bool = False
    dir: Optional[str] = None


@dataclasses.dataclass
class RunConfig:
    """One run of the pipeline: every stage's settings, the seed and the run directory.

    ``relax`` is the relaxation the model is fine-tuned through and delivered with: its rule, step size
    (``step_size`` None: the validation split's best constant step) and step mode, stop rule and gradient
    method. The baselines relax with the same stop rule and frame budget, under their own rules (a
    constant-step descent grid, FIRE). ``resume`` continues an interrupted run from its last checkpoints."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    relax: RelaxConfig = dataclasses.field(default_factory=lambda: RelaxConfig(step_size=None, step_mode="learned"))
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    seed: int = 0
    run_dir: str = "runs/default"
    resume: bool = False
    progress: bool = True
    plots: bool = True
    distributed: parallel.DistributedConfig = dataclasses.field(default_factory=parallel.DistributedConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Refuse settings that contradict each other or that no run can use (one-line ``ValueError`` naming the
        key), before anything is computed. The checks that need the data (a structure larger than the model or
        than the largest of ``dataset.buckets``) are :func:`~bptt_jax.pipeline.data.load_split`'s."""
        if self.logging.tensorboard and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError("logging.tensorboard=true needs tensorboardX: pip install 'bptt-jax[tensorboard]'")
        ft = self.finetune
        try:
            model = self.model.build()
        except TypeError as err:  # an override the model has no field for
            raise ValueError(f"model.overrides={self.model.overrides!r}: {err}") from None
        max_atoms = getattr(model, "max_atoms", None)
        require(max_atoms is None or is_count(max_atoms, 1), "model.overrides.max_atoms", max_atoms,
                "an integer of at least 1")
        if ft.variable_stop and ft.stop_frames_range[1] > self.relax.max_frames:
            raise ValueError(f"finetune.stop_frames_range {list(ft.stop_frames_range)} exceeds "
                             f"relax.max_frames {self.relax.max_frames}")
        if self.relax.noise or self.relax.noise_anneal != 1:
            raise ValueError("relax.noise would also perturb the baselines and the test relaxations; training-only "
                             "exploration noise is finetune.noise (and finetune.noise_frame_anneal)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """The run configuration a run directory's ``run_config.json`` holds (:func:`~bptt_jax.pipeline.report.
        jsonable`), also as written before each setting had one home: ``data.max_frames`` and
        ``finetune.{rule, step_mode, step_size, step_head}`` move to ``relax``, ``relax.remat`` becomes
        ``grad_mode=remat``."""
        d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
        data, relax, ft = d.get("data", {}), d.get("relax", {}), d.get("finetune", {})
        if "max_frames" in data:
            relax["max_frames"] = data.pop("max_frames")
        for key in ("rule", "step_mode", "step_size", "step_head"):
            if key in ft:
                relax[key] = ft.pop(key)
        if relax.pop("remat", False) and relax.get("grad_mode", "full") == "full":
            relax.update(grad_mode="remat", remat_segment=1)
        relax["fire"] = tuple(tuple(p) for p in relax.get("fire", ()))
        relax["step_head"] = tuple(tuple(p) for p in relax["step_head"]) if isinstance(
            relax.get("step_head"), list) else relax.get("step_head", ())
        if isinstance(data.get("buckets"), list):
            data["buckets"] = tuple(data["buckets"])
        if "generator" in data:
            data["generator"] = dict(data["generator"] or {})
        if "model" in d and "overrides" in d["model"]:
            d["model"]["overrides"] = dict(d["model"]["overrides"] or {})
        ev = d.get("eval", {})
        if "step_grid" in ev:
            ev["step_grid"] = tuple(float(x) for x in ev["step_grid"])
        parts = {"data": DataConfig, "model": ModelConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig,
                 "eval": EvalConfig, "distributed": parallel.DistributedConfig, "logging": LoggingConfig}
        kw = {k: parts[k](**d[k]) for k in parts if k in d}
        if "relax" in d:
            kw["relax"] = RelaxConfig(**relax)
        kw.update({k: d[k] for k in ("seed", "run_dir", "resume", "progress", "plots") if k in d})
        return cls(**kw)
