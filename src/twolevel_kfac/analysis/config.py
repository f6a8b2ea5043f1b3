"""The ``tlkfac analyze`` configuration: a pydantic model of the YAML file.

Unknown keys are errors (``extra="forbid"``), and every error names the offending key::

    name: curves_small
    seed: 0
    model: {kind: mlp, sizes: [49, 16, 8, 4, 8, 16, 49], activation: relu}
    # or {kind: cnn, channels: [4, 8], image_size: 14}, {kind: vit, image_size: 28, patch: 7}
    data: {name: curves, image_size: 7, n_train: 2048}
    likelihood: bernoulli          # categorical | bernoulli | gaussian
    fisher: true                   # true (exact expectation) | empirical | mc (mc_samples)
    batch_size: 32
    damping: 1.0e-3                # λ of the main analysis
    damping_sweep: [1.0e-4, 1.0e-3, 1.0e-2, 0.1, 1.0]
    state_steps: 20                # analyse the network after 20 exact-curvature steps
    state_method: kfac             # … of this method (train.lr, train.damping); 0 = init
    train: {steps: 60, lr: 0.3, checkpoint_every: 10}
    backend: auto                  # dense up to dense_max_params, else matrix_free
    matrix_free: {cg_tol: 1.0e-10, lanczos_steps: 100}
    along_run: {run_dir: results/along_run_train/kfac_seed0}  # or --run: a tlkfac run's snapshots
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from ..experiments.config_errors import format_error as problem_line
from ..twolevel.coarse_spaces import COARSE_SPACES
from .backends import MatrixFreeOptions
from .exact import Curvature
from .operators import ALL_METHODS, MethodSet, parse_method, twolevel_name

DEFAULT_SWEEP = (1e-4, 1e-3, 1e-2, 0.1, 1.0)
GALERKIN_SPACES = tuple(s for s in COARSE_SPACES if s != "tselepidis")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_methods(names: list[str] | None) -> None:
    """Raise ``ValueError`` unless every name is a method of :mod:`.operators`."""
    for name in names or []:
        parse_method(name)


def _check_spaces(names: list[str] | None) -> None:
    """Raise ``ValueError`` unless every name is a coarse space."""
    for name in names or []:
        if name not in COARSE_SPACES:
            raise ValueError(f"unknown coarse space {name!r}; allowed: {COARSE_SPACES}")


class ModelSpec(_Strict):
    """A small network: ``mlp`` (Linear layers of ``sizes``), ``cnn`` (Conv2d layers of
    ``channels``, then one Linear head to ``num_outputs``) or ``vit`` (a tiny Vision
    Transformer, :mod:`.vit`: ``patch``-sided patches of the ``image_size``² image by a
    Conv2d, ``depth`` pre-norm encoder layers of width ``width`` with ``heads`` heads and a
    feed-forward of ``ffn_ratio·width``, ``activation`` inside it, mean over the tokens,
    LayerNorm, Linear head to ``num_outputs``)."""

    kind: Literal["mlp", "cnn", "vit"] = "mlp"
    sizes: list[int] = Field(default_factory=list, description="mlp widths, input first")
    activation: Literal["relu", "gelu", "tanh", "sigmoid", "none"] = "tanh"
    bias: bool = True
    in_channels: int = Field(default=1, ge=1)
    image_size: int = Field(default=14, ge=1)
    channels: list[int] = Field(default_factory=list)
    kernel_size: int = Field(default=3, ge=1)
    stride: int = Field(default=2, ge=1)
    num_outputs: int = Field(default=10, ge=1)
    patch: int = Field(default=7, ge=1, description="vit: patch side")
    width: int = Field(default=12, ge=1, description="vit: token width")
    depth: int = Field(default=2, ge=1, description="vit: encoder layers")
    heads: int = Field(default=2, ge=1, description="vit: attention heads")
    ffn_ratio: int = Field(default=2, ge=1, description="vit: feed-forward width / width")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.kind == "mlp" and (len(self.sizes) < 2 or min(self.sizes) < 1):
            raise ValueError("model.sizes: an mlp needs at least two positive widths")
        if self.kind == "cnn" and (not self.channels or min(self.channels) < 1):
            raise ValueError("model.channels: a cnn needs at least one positive channel count")
        if self.kind == "vit" and self.image_size % self.patch:
            raise ValueError(
                f"model.patch: {self.patch} does not divide model.image_size {self.image_size}"
            )
        if self.kind == "vit" and self.width % self.heads:
            raise ValueError(f"model.heads: {self.heads} does not divide model.width {self.width}")
        return self


class DataSpec(_Strict):
    """The data: ``synthetic`` (a random teacher, no files), ``curves``, ``mnist`` or
    ``fashion_mnist`` (via :func:`twolevel_kfac.experiments.data.load_dataset`), images
    average-pooled to ``image_size``², inputs flattened for an mlp."""

    name: Literal["synthetic", "curves", "mnist", "fashion_mnist"] = "synthetic"
    n_train: int = Field(default=1024, ge=1)
    image_size: int | None = Field(default=None, ge=1)
    autoencoder: bool = False
    data_dir: str | None = None


class TrainSpec(_Strict):
    """Training with exact curvature (:mod:`.training`): ``steps`` of ``θ ← θ − lr·ν·d`` per
    method of ``methods`` (``ν`` the KL-clipping factor when ``kl_clip`` is set, else 1),
    metrics of ``metric_methods`` every ``checkpoint_every`` steps, the coarse gain of
    ``gain_spaces`` at every step (plotted for the run ``gain_run``), and the loss on the
    first ``eval_size`` samples of the pool."""

    steps: int = Field(default=0, ge=0)
    lr: float = Field(default=0.1, gt=0)
    damping: float | None = Field(default=None, gt=0, description="default: the analysis damping")
    checkpoint_every: int = Field(default=10, ge=1)
    kl_clip: float | None = Field(default=None, gt=0, description="c of ν = min(1, √(c/|dᵀg|))")
    methods: list[str] = Field(
        default_factory=lambda: ["exact", "block_diagonal", "kfac", "nicolaides+adef2"]
    )
    metric_methods: list[str] = Field(
        default_factory=lambda: [
            "block_diagonal",
            "kfac",
            *(twolevel_name(s, "adef2") for s in GALERKIN_SPACES),
        ]
    )
    gain_spaces: list[str] = Field(default_factory=lambda: list(GALERKIN_SPACES))
    gain_run: str = "kfac"
    eval_size: int = Field(default=256, ge=1)

    @field_validator("methods", "metric_methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        _check_methods(value)
        return value

    @field_validator("gain_spaces")
    @classmethod
    def _spaces(cls, value: list[str]) -> list[str]:
        _check_spaces(value)
        return value

    @model_validator(mode="after")
    def _gain_run(self) -> TrainSpec:
        if self.steps and self.gain_run not in self.methods:
            raise ValueError(f"train.gain_run {self.gain_run!r} is not in train.methods")
        return self


class AlongRunSpec(_Strict):
    """The metrics along a real training run (:mod:`.along_run`): at every model snapshot
    of the ``tlkfac run`` directory ``run_dir`` (kept with ``problem.keep_checkpoints:
    true``; ``tlkfac analyze --run DIR`` overrides it), on the fixed analysis batch, the
    direction metrics of ``methods`` (default ``train.metric_methods``) and the coarse gain
    ``E(β*) − E(0)`` of ``spaces`` (default ``train.gain_spaces``), at ``λ = damping``
    (default: the analysis damping). A relative ``run_dir`` is relative to the working
    directory."""

    run_dir: str | None = None
    methods: list[str] | None = None
    spaces: list[str] | None = None
    damping: float | None = Field(default=None, gt=0)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        _check_methods(value)
        return value

    @field_validator("spaces")
    @classmethod
    def _spaces(cls, value: list[str] | None) -> list[str] | None:
        _check_spaces(value)
        return value


class AnalyzeConfig(_Strict):
    """The whole ``tlkfac analyze`` configuration.

    Attributes:
        name: the run's name (default output directory ``results/analysis/<name>``).
        seed: seeds the initialisation, the data permutation and the batches.
        model / data / train: :class:`ModelSpec`, :class:`DataSpec`, :class:`TrainSpec`.
        likelihood: ``categorical`` | ``bernoulli`` | ``gaussian`` (the loss is its NLL).
        fisher: ``true`` (exact expectation over the likelihood) | ``empirical`` | ``mc``.
        mc_samples: targets sampled per input for ``fisher: mc``.
        batch_size: samples of the analysed batch (and of each training step).
        damping: λ of the main analysis (``F̂ = F + λI``, KFAC damped by ``damping_mode``).
        damping_mode: KFAC's damping (``kfac`` and the two-level fine level).
        damping_sweep: the λ of the sweep (the authors': 1e-4 … 1).
        methods: the analysed methods (default: all; ``exact`` is always added).
        spectra: the methods whose spectrum of ``P F̂`` is computed (default: all).
        step_size: α of the predicted / actual decrease of the step ``−α d``.
        coarse_scale: ω_c of the two-level combinations.
        spectral_which: eigenpair of the spectral coarse space.
        backend: ``auto`` (``dense`` when the network has at most ``dense_max_params``
            analysed parameters, else ``matrix_free``) | ``dense`` | ``matrix_free``
            (:mod:`.backends`).
        dense_max_params: the largest network ``auto`` analyses with dense ``P × P``
            matrices (``O(P²)`` memory, ``O(P³)`` spectra).
        max_params: refuse larger networks (either backend).
        matrix_free: CG tolerance, Lanczos steps, … (:class:`.backends.MatrixFreeOptions`).
        state_steps: analyse the network after this many exact-curvature training steps of
            ``state_method`` (``train.lr``, ``train.damping``); 0 = at initialisation.
        state_method: the method that produces the analysed state.
        along_run: the metrics at the snapshots of a ``tlkfac run`` (:class:`AlongRunSpec`).
    """

    name: str = "analysis"
    seed: int = 0
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    likelihood: Literal["categorical", "bernoulli", "gaussian"] = "categorical"
    fisher: Literal["true", "empirical", "mc"] = "true"
    mc_samples: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    damping: float = Field(default=1e-3, gt=0)
    damping_mode: Literal["per_factor", "pi", "eigen_sum"] = "per_factor"
    damping_sweep: list[float] = Field(default_factory=lambda: list(DEFAULT_SWEEP))
    methods: list[str] | None = None
    spectra: list[str] | None = None
    step_size: float = Field(default=1.0, gt=0)
    coarse_scale: float = Field(default=1.0, ge=0)
    spectral_which: Literal["smallest", "largest"] = "smallest"
    backend: Literal["auto", "dense", "matrix_free"] = "auto"
    dense_max_params: int = Field(default=12000, ge=1)
    max_params: int = Field(default=100_000, ge=1)
    matrix_free: MatrixFreeOptions = Field(default_factory=MatrixFreeOptions)
    state_steps: int = Field(default=0, ge=0)
    state_method: str = "kfac"
    train: TrainSpec = Field(default_factory=TrainSpec)
    along_run: AlongRunSpec = Field(default_factory=AlongRunSpec)

    @field_validator("fisher", mode="before")
    @classmethod
    def _fisher(cls, value: object) -> object:
        # YAML reads a bare `fisher: true` as a boolean.
        return "true" if value is True else value

    @field_validator("damping_sweep")
    @classmethod
    def _sweep(cls, value: list[float]) -> list[float]:
        if not value or any(not v > 0 for v in value):  # (an empty one failed in the plot)
            raise ValueError("damping_sweep: one damping or more, every one > 0")
        return value

    @field_validator("state_method")
    @classmethod
    def _state_method(cls, value: str) -> str:
        parse_method(value)
        return value

    @field_validator("methods", "spectra")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        _check_methods(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AnalyzeConfig:
        if self.likelihood == "categorical" and self.data.autoencoder:
            raise ValueError("likelihood 'categorical' needs labels, not data.autoencoder")
        if self.data.name == "curves" and self.likelihood == "categorical":
            raise ValueError("data 'curves' has no labels: use likelihood bernoulli/gaussian")
        if self.batch_size > self.data.n_train:
            raise ValueError(
                f"batch_size {self.batch_size} is more than the {self.data.n_train} samples of "
                "the pool (data.n_train): lower batch_size or raise data.n_train"
            )
        return self

    @property
    def method_names(self) -> list[str]:
        """The methods analysed: ``methods`` or all of them (``exact`` always first)."""
        names = list(ALL_METHODS) if self.methods is None else list(self.methods)
        return ["exact", *[n for n in names if n != "exact"]]

    def resolve_backend(self, num_params: int) -> str:
        """The backend for a network of ``num_params`` analysed parameters.

        Raises:
            ValueError: if ``num_params`` exceeds ``max_params``, or a forced ``dense``
                backend's matrices would not fit in memory (:func:`check_dense_fits`).
        """
        if num_params > self.max_params:
            raise ValueError(
                f"the network has {num_params} analysed parameters, more than max_params="
                f"{self.max_params}"
            )
        if self.backend == "dense":
            check_dense_fits(num_params)
        if self.backend != "auto":
            return self.backend
        return "dense" if num_params <= self.dense_max_params else "matrix_free"

    def method_set(
        self, model: nn.Module, curvature: Curvature, damping: float, backend: str
    ) -> MethodSet:
        """The :class:`MethodSet` of this configuration at one state and damping."""
        return MethodSet(
            model,
            curvature,
            damping,
            self.damping_mode,
            self.coarse_scale,
            self.spectral_which,
            backend,
            self.matrix_free,
        )

    @property
    def along_run_methods(self) -> list[str]:
        """The methods measured along a run: ``along_run.methods`` or ``train.metric_methods``."""
        spec = self.along_run
        return list(spec.methods if spec.methods is not None else self.train.metric_methods)

    @property
    def along_run_spaces(self) -> list[str]:
        """The coarse spaces measured along a run (``along_run.spaces`` or ``gain_spaces``)."""
        spec = self.along_run
        return list(spec.spaces if spec.spaces is not None else self.train.gain_spaces)

    @property
    def spectrum_methods(self) -> list[str]:
        """The methods whose spectrum of ``P F̂`` is computed (default: all)."""
        return self.method_names if self.spectra is None else list(self.spectra)


def format_error(error: ValidationError, source: str) -> str:
    """A one-line-per-problem message naming each offending key (an unknown one with its
    closest allowed keys, as the run configs' messages do)."""
    lines = [f"invalid analysis config {source}:"]
    lines += [f"  {problem_line(item, AnalyzeConfig)}" for item in error.errors()]
    return "\n".join(lines)


def load_config(path: str | Path) -> AnalyzeConfig:
    """Read and validate an analysis YAML file.

    Args:
        path: the YAML file.

    Returns:
        The validated configuration.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the YAML is malformed or does not validate (the message names the
            keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"analysis config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"analysis config {path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ValueError(f"analysis config {path} must be a mapping of keys")
    try:
        return AnalyzeConfig.model_validate(raw)
    except ValidationError as error:
        raise ValueError(format_error(error, str(path))) from None


DENSE_MATRICES = 3
"""The ``P × P`` float64 matrices the dense backend holds at once (``F``, ``F̂`` and a
preconditioner or its product), for :func:`check_dense_fits`."""


def check_dense_fits(num_params: int) -> None:
    """Refuse ``backend: dense`` where its matrices would take more than this machine's
    memory (the process was killed by the system, nothing printed and nothing saved).

    Raises:
        ValueError: the size of one matrix, the machine's memory and the way out.
    """
    each = num_params**2 * 8
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): not checked
        return
    if DENSE_MATRICES * each > memory:
        raise ValueError(
            f"backend: dense holds {DENSE_MATRICES} float64 matrices of {num_params} × "
            f"{num_params} ({each / 2**30:.1f} GiB each), more than this machine's "
            f"{memory / 2**30:.1f} GiB: use backend: matrix_free (or auto, which picks it "
            "above dense_max_params)"
        )
