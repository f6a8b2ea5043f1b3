"""The training loop of one run (one method, one seed): metrics, checkpoints, resume.

``train_run(config, run_dir)`` trains the single method of a resolved run config
(``ExperimentConfig.for_run``) through exactly

    opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()

and writes into ``run_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``checkpoint.pt`` and ``provenance.jsonl`` (commit, torch, threads, machine of every start
and resume: :mod:`.provenance`). Determinism: the model is built after
``torch.manual_seed(seed)``, the data order of epoch ``e`` is a permutation drawn from a
generator seeded with ``(seed, e)``, KFAC's sampler has its own seeded generator, and a
checkpoint holds everything else (model, optimizer state, global RNG states, the position
in the epoch, the loss accumulators, the early-stopping state), so ``resume=True``
continues bit-identically on CPU.

Records (``metrics.jsonl``): ``event`` is ``"epoch"`` (end of an epoch: ``train_loss`` is
the mean of its minibatch losses, held-out metrics, mean diagnostics), ``"step"`` (every
``problem.log_every`` steps: the mean loss since the last step record and the step's
diagnostics) or ``"partial"`` (the state where ``--max-steps`` or Ctrl-C stopped a run
mid-epoch; dropped on resume). ``wall_time_s`` counts training steps only. Held-out
metrics: ``val_*`` on the ``dataset.val_fraction`` split of the training set (the
paper's "validation"), ``test_*`` on the official test set; ``*_acc`` for
classification. Denormal floats are flushed to zero during a run (``denormals_flushed``):
denormal activations made CPU steps several times slower.

Distributed: when ``torch.distributed`` is initialised (``tlkfac run --nproc N`` or
``torchrun``: ``experiments.launch``), every rank runs this loop on its part of each global
batch and rank 0 alone writes; the conventions are those of ``experiments.parallel``.

Device: ``problem.device`` (``experiments.device``): the model, each minibatch (copied from
the host-held data set when it is used) and the evaluation; checkpoints hold CPU tensors.

Non-finite values: a step whose loss or gradient is NaN/Inf is skipped (nothing reaches
the parameters, the optimizer state or KFAC's running factors; the KFAC family does this
itself and counts it in ``opt.nonfinite_steps``, SGD/Adam are checked here) and counted:
every record carries ``nonfinite_steps`` (the total so far), and an epoch's ``train_loss``
is the mean of its finite minibatch losses (NaN when there were none: such an epoch, or
``problem.max_consecutive_nonfinite`` skipped steps in a row, stop the run with
``stop_reason == "diverged"`` and a message on stderr); since skipped steps change nothing,
the final checkpoint holds the last good parameters (never overwritten by non-finite ones).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from twolevel_kfac.experiments import provenance
from twolevel_kfac.experiments.checkpoint import (
    get_rng_state,
    keep_snapshot,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from twolevel_kfac.experiments.config import ExperimentConfig
from twolevel_kfac.experiments.device import resolve_device
from twolevel_kfac.experiments.guarded_step import guarded_step
from twolevel_kfac.experiments.interrupt import interrupt_flag
from twolevel_kfac.experiments.losses import loss_function
from twolevel_kfac.experiments.metrics import MetricsWriter, NullMetricsWriter, read_metrics
from twolevel_kfac.experiments.models import build_model
from twolevel_kfac.experiments.optimizers import make_optimizer
from twolevel_kfac.experiments.parallel import Parallel
from twolevel_kfac.experiments.problem import (
    Data,
    check_batch_norm_rows,
    denormals_flushed,
    evaluate,
    load_data,
)
from twolevel_kfac.experiments.progress import progress_bar
from twolevel_kfac.experiments.run_state import (
    FINAL_REASONS,
    RESULT_FILE,
    LoopState,
    RunResult,
    forget_start,
    run_limits,
    write_result,
)
from twolevel_kfac.finite import all_finite
from twolevel_kfac.placement import CPU, move_tensors

__all__ = ["Data", "LoopState", "RunResult", "evaluate", "load_data", "make_optimizer", "train_run"]


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of an epoch: a permutation seeded by ``(seed, epoch)``."""
    (state,) = np.random.SeedSequence([seed, epoch]).generate_state(1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(state)))


class _Loop:
    """One run's model, optimizer, data and state, and the steps between them."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, data: Data, par: Parallel) -> None:
        self.config, self.problem, self.run_dir, self.data = config, config.problem, run_dir, data
        (self.label,) = config.methods
        self.seed = self.problem.seeds[0]
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)  # noqa: NPY002 (user code may use it)
        self.device = resolve_device(self.problem.device, par.rank, par.world_size)
        model = build_model(self.problem.model.name, **self.problem.model.kwargs)
        self.model = model.to(self.device)
        self.par = par
        self.net = self.par.wrap(self.model)  # what trains: DDP around the model, or itself
        kind, kwargs = config.method_kwargs(self.label, self.seed)
        self.optimizer = make_optimizer(kind, self.net, **kwargs)
        self.loss_fn = loss_function(self.problem.loss, self.problem.loss_reduction)
        self.state = LoopState()
        n = len(data.train[0])
        self.par.check_split(n, self.problem.batch_size)
        check_batch_norm_rows(self.model, n, self.problem.batch_size, self.par.world_size)
        self.n_batches = math.ceil(n / self.problem.batch_size)
        self._order: tuple[int, tuple[Tensor, ...]] = (-1, ())

    # ------------------------------------------------------------ checkpoints
    def save(self, full: bool = True) -> None:
        """Checkpoint (every rank: ``state_dict()`` may be a collective; rank 0 writes)."""
        payload = {
            "fingerprint": self.config.fingerprint(),
            "config": json.dumps(self.config.fingerprinted(), sort_keys=True),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if full else None,
            "rng": get_rng_state(),
            "loop": asdict(self.state),
        }
        payload = move_tensors(payload, CPU)  # a GPU run's checkpoint loads anywhere
        if self.par.is_main:
            save_checkpoint(self.run_dir / "checkpoint.pt", payload)
            keep_snapshot(self.problem, self.run_dir, self.state.step, self.model.state_dict())

    def restore(self) -> None:
        ck = self.par.from_main(
            lambda: load_checkpoint(
                self.run_dir / "checkpoint.pt",
                self.config.fingerprint(),
                self.config.fingerprinted(),
            )
        )
        self.model.load_state_dict(ck["model"])
        set_rng_state(ck["rng"])
        self.state = LoopState(**ck["loop"])
        if ck["optimizer"] is not None:
            self.optimizer.load_state_dict(ck["optimizer"])
        elif not self.finished():
            raise ValueError(
                f"{self.run_dir / 'checkpoint.pt'} holds only the model of a finished run "
                "(final_checkpoint: model), so it cannot be continued; start a new run directory"
            )

    def training_time(self) -> float:
        """Seconds of training steps on ``problem.clock``: wall or this process's CPU time."""
        s = self.state
        return s.cpu_time_s if self.problem.clock == "cpu" else s.wall_time_s

    def finished(self) -> bool:
        return self.state.stop_reason in FINAL_REASONS or self.state.epoch >= self.problem.epochs

    # ------------------------------------------------------------ steps
    def step(self) -> float:
        """One optimizer step on the next minibatch; returns its loss (NaN: no step)."""
        s = self.state
        if self._order[0] != s.epoch:
            order = _epoch_order(len(self.data.train[0]), self.seed, s.epoch)
            self._order = (s.epoch, order.split(self.problem.batch_size))
        idx = self.par.shard(self._order[1][s.position])
        self.model.train()
        start, cpu_start = time.perf_counter(), time.process_time()
        x, y = (part[idx].to(self.device) for part in self.data.train)  # one batch at a time
        value, stepped = guarded_step(
            self.net, self.optimizer, lambda: self.loss_fn(self.net(x), y), self.par.global_loss
        )
        s.wall_time_s += time.perf_counter() - start
        s.cpu_time_s += time.process_time() - cpu_start
        s.step, s.position = s.step + 1, s.position + 1
        if stepped:
            s.consecutive_nonfinite = 0
            s.loss_sum, s.loss_count = s.loss_sum + value, s.loss_count + 1
            s.log_sum, s.log_count = s.log_sum + value, s.log_count + 1
        else:
            s.nonfinite_steps += 1
            s.consecutive_nonfinite += 1
            value = math.nan if math.isfinite(value) else value
        for key, val in self.diagnostics().items():
            s.diag_sums[key] = s.diag_sums.get(key, 0.0) + val
            s.diag_counts[key] = s.diag_counts.get(key, 0) + 1
        return value

    def params_finite(self) -> bool:
        """Whether every parameter and buffer of the model is finite."""
        return all_finite(self.model.parameters()) and all_finite(self.model.buffers())

    def diagnostics(self) -> dict[str, float]:
        stats = getattr(self.optimizer, "last_stats", None) or {}
        return {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}

    def base_record(self, event: str, epoch: float) -> dict[str, Any]:
        s = self.state
        return {
            "event": event,
            "epoch": epoch,
            "step": s.step,
            "wall_time_s": s.wall_time_s,
            "cpu_time_s": s.cpu_time_s,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "nonfinite_steps": s.nonfinite_steps,
        }

    def step_record(self) -> dict[str, Any]:
        s = self.state
        record = self.base_record("step", s.epoch + s.position / self.n_batches)
        record["train_loss"] = s.log_sum / s.log_count if s.log_count else math.nan
        record |= self.diagnostics()
        s.log_sum, s.log_count = 0.0, 0
        return record

    def epoch_record(self, event: str = "epoch") -> dict[str, Any]:
        """The record of the (possibly partial) current epoch, with held-out metrics."""
        s = self.state
        epoch: float = (
            s.epoch + 1 if s.position == self.n_batches else s.epoch + s.position / self.n_batches
        )
        record = self.base_record(event, epoch)
        record["train_loss"] = s.loss_sum / s.loss_count if s.loss_count else math.nan
        record |= {k: s.diag_sums[k] / s.diag_counts[k] for k in s.diag_sums}
        last = event != "epoch" or s.epoch + 1 >= self.problem.epochs or s.stop_reason != ""
        if last or (s.epoch + 1) % self.problem.eval_every == 0:
            record |= self.held_out()
        if s.stop_reason == "diverged":
            record["diverged"] = True
        return record

    def held_out(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if not self.par.is_main:  # only rank 0 writes records
            return out
        for name, split in (("val", self.data.val), ("test", self.data.test)):
            if split is not None:
                loss, acc = evaluate(self.model, self.loss_fn, *split, self.problem.eval_batch_size)
                out[f"{name}_loss"] = loss
                if acc is not None:
                    out[f"{name}_acc"] = acc
        return out

    def end_epoch(self, writer: MetricsWriter) -> dict[str, Any]:
        """Write the epoch record, update early stopping, move to the next epoch."""
        s, stopping = self.state, self.problem.early_stopping
        record = self.epoch_record()
        writer.write(record)
        loss = record["train_loss"]
        if stopping is not None and math.isfinite(loss):
            if loss < s.best_loss - stopping.min_delta:
                s.best_loss, s.bad_epochs = loss, 0
            else:
                s.bad_epochs += 1
                if s.bad_epochs >= stopping.patience:
                    s.stop_reason = "early_stopping"
        s.epoch, s.position = s.epoch + 1, 0
        s.loss_sum, s.loss_count, s.diag_sums, s.diag_counts = 0.0, 0, {}, {}
        return record


def _run_loop(
    loop: _Loop, writer: MetricsWriter, max_steps: int | None, progress: bool
) -> tuple[bool, str]:
    """Train until finished, ``max_steps``, the time budget or Ctrl-C.

    Returns:
        ``(interrupted, why a partial record is due or "")``.
    """
    s, problem = loop.state, loop.problem
    desc, total = f"{loop.label} seed {loop.seed}", problem.epochs * loop.n_batches
    bar = progress_bar(total, desc, progress and loop.par.is_main, initial=s.step)
    with interrupt_flag(announce=loop.par.is_main) as flag, bar:
        while not loop.finished():
            interrupted = loop.par.any(flag.is_set())
            if interrupted or (max_steps is not None and s.step >= max_steps):
                return interrupted, "partial" if s.position else ""
            loop.step()
            stuck = s.position == loop.n_batches and s.loss_count == 0  # no finite step
            if s.consecutive_nonfinite >= problem.max_consecutive_nonfinite or stuck:
                s.stop_reason = "diverged"
                print(
                    f"{loop.label} seed {loop.seed}: stopped after {s.consecutive_nonfinite} "
                    f"non-finite (NaN/Inf) steps in a row at step {s.step} "
                    "(problem.max_consecutive_nonfinite, or a whole epoch); the checkpoint "
                    "keeps the last good parameters",
                    file=sys.stderr,
                )
            elif problem.time_budget_s is not None and loop.par.any(
                loop.training_time() >= problem.time_budget_s
            ):
                s.stop_reason = "time_budget"
            if problem.log_every and s.step % problem.log_every == 0:
                writer.write(loop.step_record())
            if s.position == loop.n_batches or s.stop_reason:
                record = loop.end_epoch(writer)
                bar.set_postfix(epoch=s.epoch, loss=f"{record['train_loss']:.4g}")
            bar.update(1)
            if problem.checkpoint_every and s.step % problem.checkpoint_every == 0:
                s.records = writer.count
                if loop.params_finite():
                    loop.save()
    return False, ""


@denormals_flushed()
def train_run(
    config: ExperimentConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    data: Data | None = None,
    data_dir: str | Path | None = None,
) -> RunResult:
    """Train the single (method, seed) of a resolved run config into ``run_dir``.

    Args:
        config: A config with one method and one seed (``ExperimentConfig.for_run``).
        run_dir: Output directory (created).
        resume: Continue from ``run_dir/checkpoint.pt`` (refused if it was written for
            another config). Without it, a directory that already holds a run is refused.
        max_steps: Stop (checkpointed, not finished) once this many steps were taken in
            total; ``None`` for no limit.
        progress: a tqdm bar on a terminal, a line a minute elsewhere.
        data: Pre-loaded data (``load_data``), e.g. shared by a comparison's runs.
        data_dir: Data directory for ``load_data`` when ``data`` is not given.

    Returns:
        The run's outcome; ``records`` are all records of ``metrics.jsonl``.

    Raises:
        ValueError: Not a single-run config, an occupied ``run_dir`` without ``resume``,
            or a checkpoint of another config.
        FileNotFoundError: ``resume`` without a checkpoint; missing data.
    """
    if len(config.methods) != 1 or len(config.problem.seeds) != 1:
        raise ValueError("train_run needs a single-run config (ExperimentConfig.for_run)")
    run_dir, par = Path(run_dir), Parallel.current()
    metrics, checkpoint = run_dir / "metrics.jsonl", run_dir / "checkpoint.pt"
    if not resume and par.from_main(lambda: checkpoint.exists() or metrics.exists()):
        raise ValueError(
            f"{run_dir} already holds a run; pass --resume to continue it "
            "or choose another output directory"
        )
    data = data if data is not None else load_data(config.problem, data_dir)
    loop = _Loop(config, run_dir, data, par)
    if resume:
        loop.restore()
        if not loop.finished() and par.is_main:  # continued: no longer the result of before
            (run_dir / RESULT_FILE).unlink(missing_ok=True)
    done = resume and loop.finished()  # (nothing to train: nothing recorded or rewritten)
    if par.is_main and not done:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
        )
        keep_snapshot(config.problem, run_dir, loop.state.step, loop.model.state_dict())
        provenance.record(run_dir, "resume" if resume else "start")
    if not resume:  # a good checkpoint from the start: a diverged run never saves NaN/Inf
        loop.save()
    writer_class = MetricsWriter if par.is_main else NullMetricsWriter
    with writer_class(metrics, loop.state.records if resume else None) as writer:
        try:
            interrupted, partial = _run_loop(loop, writer, max_steps, progress)
        except Exception as error:
            forget_start(run_dir, error, par.is_main, not resume and loop.state.step == 0)
            raise
        loop.state.records = writer.count
        if not done and (loop.params_finite() or not par.from_main(checkpoint.exists)):
            loop.save(full=not (loop.finished() and config.problem.final_checkpoint == "model"))
        if partial:
            writer.write(loop.epoch_record("partial"))
    s = loop.state
    result = RunResult(
        run_dir,
        read_metrics(metrics) if par.is_main else [],
        loop.finished(),
        interrupted,
        s.stop_reason or ("epochs" if loop.finished() else "stopped"),
        s.step,
    )
    if result.finished and par.is_main:
        write_result(result, config.fingerprint(), run_limits(config.problem))
    return result
