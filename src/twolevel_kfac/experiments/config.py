"""Experiment configs: YAML in, validated pydantic models out; errors name the key.

One schema serves ``tlkfac run | compare | tune``: a ``problem`` (model, data, loss, batch
size, epochs, evaluation, checkpoints, early stopping, seeds), shared optimizer
``defaults`` and the ``methods`` to run (a label → optimizer arguments; the label is the
optimizer's name unless the entry sets ``optimizer:``). A single run is the same schema
with one method and one seed: ``ExperimentConfig.for_run`` resolves every default into
the method entry, and that resolved config is what a run directory stores and what its
checkpoint fingerprints. Example::

    problem:
      name: CURVES
      model: {name: curves_autoencoder}
      dataset: {name: curves, n_train: 5000, n_test: 1000}
      loss: bce
      batch_size: 256
      epochs: 60
      seeds: [0, 1, 2]
    defaults:
      weight_decay: 1.0e-3
      kfac: {lr: 0.1, damping: 0.1, kl_clip: 1.0e-2, fisher_batch: 0.25}
    methods:
      kfac: {}
      nico: {}
      sgd: {lr: 1.0e-2}

YAML quirks handled here: ``1e-3`` (no dot) is read as a float, not a string; duplicate
keys are an error. Unknown keys are rejected with close matches suggested.
"""  # noqa: D214, D405, D411 (the example's "methods:" key is no docstring section)

from __future__ import annotations

import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twolevel_kfac.experiments.config_errors import check_keys, format_error, hint
from twolevel_kfac.experiments.device import check_device_spec
from twolevel_kfac.experiments.losses import CLASS_DIMS, LIKELIHOODS
from twolevel_kfac.experiments.models import MODELS
from twolevel_kfac.experiments.optimizers import (
    KFAC_FAMILY,
    METHODS,
    TWO_LEVEL_METHODS,
    allowed_arguments,
    make_optimizer,
)
from twolevel_kfac.experiments.yaml_io import config_diff, read_yaml

__all__ = ["ExperimentConfig", "config_diff", "load_config", "parse_config", "read_yaml"]

# Keys that may change between a checkpoint and its resumption (they do not change the
# trajectory up to the checkpoint): more epochs, another checkpoint interval, …
UNFINGERPRINTED = (
    "problem.name",
    "problem.epochs",
    "problem.checkpoint_every",
    "problem.time_budget_s",
    "problem.clock",
    "problem.final_checkpoint",
    "problem.max_consecutive_nonfinite",
    "problem.device",  # checkpoints are device-independent: a GPU run may resume on the CPU
    "problem.keep_checkpoints",  # snapshots are extra files; the trajectory is the same
    "report",
    "tune",
)
# Keys left out of the fingerprint while they hold their default (``None``): configs written
# before the key existed keep their fingerprint, so their checkpoints stay resumable.
FINGERPRINTED_WHEN_SET = ("problem.dataset.image_size", "problem.dataset.context")
FINGERPRINTED_UNLESS = {"problem.loss_reduction": "sum"}
"""Keys added later whose default is the trajectory from before they existed: left out of
the fingerprint at that value, so older runs still resume."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """``experiments.models.MODELS`` name and constructor arguments."""

    name: str
    kwargs: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}{hint(name, MODELS)}; allowed: {list(MODELS)}")
        return name

    @model_validator(mode="after")
    def _kwargs_fit(self) -> ModelSpec:
        """The constructor accepts ``kwargs`` (checked without building the model)."""
        try:
            inspect.signature(MODELS[self.name]).bind(**self.kwargs)
        except TypeError as error:
            raise ValueError(
                f"kwargs {self.kwargs} do not fit model {self.name!r}: {error}"
            ) from None
        return self


class DatasetSpec(_Strict):
    """Data set of ``experiments.data.load_dataset`` and how it is cut."""

    name: str
    n_train: int | None = Field(default=None, gt=0, description="first n of the training set")
    n_test: int | None = Field(default=None, ge=0, description="first n of the test set; 0: none")
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0, description="held-out share of train")
    input_shape: list[int] | None = None  # reshape inputs to [N, *input_shape]
    # average-pool the images to image_size × image_size (square one-channel images when
    # the inputs are flat; image-shaped real targets, i.e. autoencoders, too): problem.load_data
    image_size: int | None = Field(default=None, gt=0)
    autoencoder: bool | None = None  # targets = inputs (default: the loader's)
    context: int | None = Field(default=None, gt=0)  # text sets: characters per window (128)
    seed: int = 0  # generator (CURVES) and train/validation split seed, fixed over runs


class EarlyStopping(_Strict):
    """Stop when the epoch train loss has not improved by ``min_delta`` for ``patience``."""

    patience: int = Field(default=10, gt=0)
    min_delta: float = Field(default=0.0, ge=0.0)


class ProblemSpec(_Strict):
    """What is trained, on what, for how long, and what is logged."""

    name: str = "experiment"
    model: ModelSpec
    dataset: DatasetSpec
    loss: Literal["bce", "mse", "cross_entropy", "sequence_cross_entropy"]
    # sum: the NLL summed over output features, batch mean (experiments.losses); mean:
    # torch's defaults (BCEWithLogitsLoss(), MSELoss(), the token mean), the authors'
    # convention. KFAC-family methods get the same loss_reduction (and class_dim -1 for
    # sequence_cross_entropy), so their MC Fisher is that of this loss.
    loss_reduction: Literal["sum", "mean"] = "sum"
    batch_size: int = Field(gt=0)
    epochs: int = Field(gt=0)
    eval_batch_size: int = Field(default=2048, gt=0)
    eval_every: int = Field(default=1, gt=0, description="epochs between evaluations")
    log_every: int | None = Field(default=None, gt=0, description="steps between step records")
    checkpoint_every: int | None = Field(default=None, gt=0, description="steps; also at the end")
    early_stopping: EarlyStopping | None = None
    time_budget_s: float | None = Field(default=None, gt=0, description="training seconds per run")
    clock: Literal["wall", "cpu"] = Field(
        default="wall",
        description="the clock of time_budget_s and of the reports' time axis: wall "
        "(perf_counter) or cpu (this process's CPU time, which other jobs on other cores "
        "hardly change; a 1-thread run's CPU seconds equal its wall seconds on an idle "
        "machine)",
    )
    # "model": a finished run's last checkpoint drops the optimizer state (KFAC factors
    # take 100s of MB for the big autoencoders); such a run cannot be extended
    final_checkpoint: Literal["full", "model"] = "full"
    # skipped NaN/Inf steps in a row that stop the run (stop_reason "diverged")
    max_consecutive_nonfinite: int = Field(default=20, gt=0)
    # auto | cpu | cuda | cuda:K (experiments.device); --device overrides it
    device: str = "auto"
    # keep a model-only snapshot DIR/snapshots/step<k>.pt at the start, at every interval
    # checkpoint and at the end (for `tlkfac analyze --run DIR`; checkpoint.keep_snapshot)
    keep_checkpoints: bool = False
    seeds: list[int] = Field(default=[0], min_length=1)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return check_device_spec(device)

    @field_validator("seeds")
    @classmethod
    def _unique(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct; got {seeds}")
        return seeds


class Defaults(_Strict):
    """Optimizer arguments shared by the methods (an entry's own values win)."""

    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)  # SGD and the KFAC family (not Adam)
    kfac: dict[str, Any] = {}  # KFAC and every two-level method: lr, damping, kl_clip, …
    twolevel: dict[str, Any] = {}  # the two-level methods: combination, coarse_refresh, …


class TuneSpec(_Strict):
    """The paper's grid search: lr × damping (lr only for SGD/Adam), lowest train loss."""

    methods: list[str] | None = None  # default: every method of the config
    lr: list[float] = [1e-1, 1e-2, 1e-3, 1e-4]
    damping: list[float] = [1e-1, 1e-2, 1e-3, 1e-4]
    epochs: int | None = Field(default=None, gt=0)  # default: problem.epochs
    seed: int | None = None  # default: problem.seeds[0]


class ReportSpec(_Strict):
    """Report settings of a comparison."""

    title: str | None = None
    target_loss: float | None = Field(default=None, gt=0.0)  # default: 1.1 × KFAC's final loss
    notes: str = ""
    # label → CSV/JSON file of (epoch, loss), relative to the working directory, drawn
    # beside the runs (experiments.reference_curves)
    references: dict[str, str] = {}
    # epochs of a table of every method's train loss beside the references (epoch_table)
    epochs: list[int] = []


_NUMBERS = frozenset({"lr", "momentum", "weight_decay", "damping", "kl_clip", "fisher_batch"})


class ExperimentConfig(_Strict):
    """A problem, shared optimizer defaults and the methods to compare."""

    problem: ProblemSpec
    defaults: Defaults = Defaults()
    methods: dict[str, dict[str, Any]] = Field(min_length=1)
    tune: TuneSpec = TuneSpec()
    report: ReportSpec = ReportSpec()

    @field_validator("methods", mode="before")
    @classmethod
    def _empty_entries(cls, methods: Any) -> Any:
        """``kfac:`` with nothing after it means ``kfac: {}``."""
        if isinstance(methods, dict):
            return {k: {} if v is None else v for k, v in methods.items()}
        return methods

    @model_validator(mode="after")
    def _check_methods(self) -> ExperimentConfig:
        check_keys("defaults.kfac", self.defaults.kfac, allowed_arguments("kfac"))
        coarse = allowed_arguments("nico") - allowed_arguments("kfac")
        check_keys("defaults.twolevel", self.defaults.twolevel, coarse)
        for label, entry in self.methods.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
                raise ValueError(f"method label {label!r}: use letters, digits, '_', '-', '.'")
            kind = entry.get("optimizer", label)
            if kind not in METHODS:
                raise ValueError(
                    f"methods.{label}: unknown optimizer {kind!r}{hint(str(kind), METHODS)}; "
                    f"allowed: {list(METHODS)} (or set 'optimizer:' in the entry)"
                )
            keys = allowed_arguments(kind) | {"optimizer", "seeds"}
            check_keys(f"methods.{label}", entry, keys)
            self._check_seeds(label)
            self._check_likelihood(label, kind)
            self._dry_build(label)
        for label in self.tune.methods or []:
            if label not in self.methods:
                raise ValueError(f"tune.methods: {label!r} is not in methods {list(self.methods)}")
        return self

    def _check_likelihood(self, label: str, kind: str) -> None:
        """A KFAC-family ``likelihood`` must be the one of ``problem.loss``."""
        if kind not in KFAC_FAMILY:
            return
        _, kwargs = self.method_kwargs(label, self.problem.seeds[0])
        wanted = LIKELIHOODS[self.problem.loss]
        given = kwargs.get("likelihood", wanted)
        if given != wanted and given in LIKELIHOODS.values():  # unknown names: _dry_build
            raise ValueError(
                f"methods.{label}: likelihood {kwargs['likelihood']!r} does not fit loss "
                f"{self.problem.loss!r} (its likelihood is {wanted!r}); drop the key or set "
                f"likelihood: {wanted}"
            )

    def _check_seeds(self, label: str) -> None:
        """A method's own ``seeds`` must be a non-empty subset of ``problem.seeds``."""
        seeds = self.methods[label].get("seeds")
        if seeds is None:
            return
        ok = isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)
        if not ok or not set(seeds) <= set(self.problem.seeds):
            raise ValueError(
                f"methods.{label}.seeds must be a non-empty list of problem.seeds "
                f"{self.problem.seeds}; got {seeds!r}"
            )

    def method_seeds(self, label: str) -> list[int]:
        """The seeds a comparison runs ``label`` with: its own ``seeds`` entry (e.g. one
        seed for the variants of a long comparison), else ``problem.seeds``."""
        return list(self.methods[label].get("seeds") or self.problem.seeds)

    def _dry_build(self, label: str) -> None:
        """Build the method's optimizer on a toy model: checks every argument value."""
        from torch import nn

        kind, kwargs = self.method_kwargs(label, self.problem.seeds[0])
        if "lr" not in kwargs:
            where = "defaults.kfac" if kind in KFAC_FAMILY else "the method entry"
            raise ValueError(f"methods.{label}: no lr given (set it in {where})")
        for key in _NUMBERS & set(kwargs):
            if isinstance(kwargs[key], str):  # (`lr: fast`, a quoted '0.1')
                raise ValueError(f"methods.{label}.{key}: a number, got {kwargs[key]!r}")
        try:
            make_optimizer(kind, nn.Linear(2, 2), **kwargs)
        except (ValueError, TypeError) as error:
            raise ValueError(f"methods.{label}: {error}") from None

    def method_kwargs(self, label: str, seed: int) -> tuple[str, dict[str, Any]]:
        """The optimizer name and its full keyword arguments for one run.

        KFAC-family methods get the likelihood of the loss (and its ``class_dim``: -1 for
        ``sequence_cross_entropy``) and the run seed as their sampler seed unless set;
        defaults apply below the entry's own values.

        Args:
            label: A key of ``methods``.
            seed: The run seed.

        Returns:
            ``(optimizer name, kwargs)`` for ``optimizers.make_optimizer``.
        """
        entry = dict(self.methods[label])
        kind = str(entry.pop("optimizer", label))
        entry.pop("seeds", None)
        d = self.defaults
        base: dict[str, Any] = {"weight_decay": d.weight_decay}
        if kind in KFAC_FAMILY:
            base |= {"momentum": d.momentum, "likelihood": LIKELIHOODS[self.problem.loss]}
            if self.problem.loss in CLASS_DIMS:  # logits with positions
                base |= {"class_dim": CLASS_DIMS[self.problem.loss]}
            if self.problem.loss_reduction != "sum":  # the optimizers' default
                base |= {"loss_reduction": self.problem.loss_reduction}
            base |= {"seed": seed, **d.kfac}
            if kind in TWO_LEVEL_METHODS:
                base |= d.twolevel
        elif kind == "sgd":
            base |= {"momentum": d.momentum, "nesterov": True}
        return kind, {**base, **entry}

    def for_run(self, label: str, seed: int) -> ExperimentConfig:
        """The single-run config of ``(label, seed)`` with every default resolved."""
        if label not in self.methods:
            raise ValueError(
                f"unknown method {label!r}{hint(label, self.methods)}; "
                f"this config has {list(self.methods)}"
            )
        kind, kwargs = self.method_kwargs(label, seed)
        data = self.model_dump(mode="json", exclude={"defaults", "tune"})
        data["methods"] = {label: {"optimizer": kind, **kwargs}}
        data["problem"]["seeds"] = [seed]
        return ExperimentConfig.model_validate(data)

    def fingerprinted(self) -> dict[str, Any]:
        """The dict the fingerprint covers (``UNFINGERPRINTED`` keys removed, the
        ``FINGERPRINTED_WHEN_SET`` keys while they are ``None`` and the
        ``FINGERPRINTED_UNLESS`` keys at their default)."""
        data = self.model_dump(mode="json")
        for dotted in (*UNFINGERPRINTED, *FINGERPRINTED_WHEN_SET, *FINGERPRINTED_UNLESS):
            *parents, last = dotted.split(".")
            node = data
            for part in parents:
                node = node[part]
            value = node.get(last)
            default = FINGERPRINTED_UNLESS.get(dotted)
            if dotted in UNFINGERPRINTED or value is None or value == default:
                node.pop(last, None)
        return data

    def fingerprint(self) -> str:
        """SHA-256 of ``fingerprinted()`` (canonical JSON)."""
        text = json.dumps(self.fingerprinted(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def parse_config(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a config mapping; ``ValueError`` lists every problem, one per line."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        lines = [format_error(e, ExperimentConfig) for e in error.errors()]
        raise ValueError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment config file."""
    return parse_config(read_yaml(path), str(path))
