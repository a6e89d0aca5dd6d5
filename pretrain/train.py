"""The one training loop: a task's batches -> its objective -> the DeepSpeed step, with checkpoints,
evaluation, non-finite handling and preemption.

    code = train(cfg, env, task, resume)          # ExitCode: OK, PREEMPTED (UserError: NONFINITE, ...)

Per optimizer step every rank consumes `accumulation` micro-batches (equal counts per rank, so no
rank waits at a collective), runs the objective and the engine's backward/step. Two agreements keep
ranks in step: "this micro-batch's loss is not finite" (one all-reduce before its backward: every
rank then skips it) and, once the step is done, "a SIGTERM/SIGUSR1 arrived" (one all-reduce at the
end of each step: a signal that arrives at any moment before that point, on any rank, makes the
step it arrived in the last one; every rank saves and exits with ExitCode.PREEMPTED, 75).
The components decide their own policy: the checkpoint manager when to save, the evaluator when to
evaluate, the metrics logger what the throughput was.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.profiler import record_function

from data_tools.errors import ExitCode, UserError
from data_tools.loader import Loader, merge_rank_cursors
from pretrain import testing_hooks
from pretrain.checkpoint import CheckpointManager, Resume, config_hash, convert_to_universal
from pretrain.config_schema import to_dict
from pretrain.dist_env import record_rank_host
from pretrain.distributed import all_gather_object, any_rank
from pretrain.engine import BatchGeometry, EngineSpec, batch_geometry, build_engine, to_engine
from pretrain.objectives import Progress, phases_of
from pretrain.preemption import PreemptionFlag
from pretrain.profiling import BACKWARD, DATA, FINITE_CHECK, FORWARD, OPTIMIZER, StepProfiler
from pretrain.run_state import RunState, TrainState
from pretrain.throughput import ThroughputMeter
from pretrain.transfer import DeviceFeeder

if TYPE_CHECKING:
    from pretrain.config import Config
    from pretrain.task import Task


def micro_step(
    engine: Any, batch: dict[str, Any], progress: Progress, after_forward: Callable[[], None] | None = None
) -> tuple[bool, dict[str, torch.Tensor]]:
    """One micro-batch on every rank: forward (the objective), agree on finiteness, backward, step.

    A non-finite loss on any rank makes every rank skip this micro-batch's backward, so no rank steps
    alone. DeepSpeed counts micro-steps in step() and updates at the boundary, so a skipped
    micro-batch just drops out. Returns (finite, logs). `after_forward`: a test hook.
    """
    with record_function(FORWARD):
        total, logs = engine(batch, progress)
    if after_forward is not None:
        after_forward()
    with record_function(FINITE_CHECK):
        finite = not any_rank(~torch.isfinite(total).all())  # reduced on the device: one host read
    if not finite:
        return False, logs
    with record_function(BACKWARD):
        engine.backward(total)
    with record_function(OPTIMIZER):
        engine.step()
    return True, logs


def as_floats(values: dict[str, Any]) -> dict[str, float]:
    """Logged values (tensors on any device, or numbers) as floats: one read per device."""
    out = {key: float(value) for key, value in values.items() if not isinstance(value, torch.Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(key)
    for keys in by_device.values():
        out.update(zip(keys, torch.stack([values[k].float().reshape(()) for k in keys]).tolist()))
    return out


def _data_stream(loader: Loader, epoch: int, cursor: dict[str, Any] | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(epoch, batch) forever: an epoch resumed from `cursor`, then whole epochs after it."""
    loader.set_epoch(epoch)
    if cursor is not None:
        loader.load_state_dict(cursor)
    while True:
        for batch in loader:
            yield epoch, batch
        epoch += 1
        loader.set_epoch(epoch)


class Trainer:
    """Builds the run's parts from a Config and a Task and runs the loop; `run()` returns the exit code."""

    def __init__(self, cfg: "Config", env: Any, task: "Task", resume: Resume | None = None):
        self.cfg, self.env, self.task = cfg, env, task
        self.rank, self.world = env.rank, env.world_size
        self.run_dir = cfg.run.path
        self.resume = resume

    # --- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        # DeepSpeed 0.19.8 calls deprecated c10d functions every step: one warning per call otherwise.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        saved = self.resume.state if self.resume is not None else None
        self.geometry: BatchGeometry = batch_geometry(
            cfg.data.batch_size,
            cfg.train.grad_accumulation,
            self.world,
            saved.global_batch if saved else cfg.train.global_batch_size,
        )
        self.loader = self.task.train_loader(self.geometry.per_rank, self.rank, self.world)
        self.tokenizer = self.loader.tokenizer
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = self.task.build_model(self.tokenizer, fresh=saved is None, say=self._say)
        torch.manual_seed(cfg.train.seed + 1000 * (self.rank + 1))  # per-rank dropout / sampling streams
        self.total_steps = self._total_steps(saved)
        universal = saved is not None and saved.world_size != self.world and cfg.zero.stage > 0
        if universal:
            convert_to_universal(self.resume.path, self.rank)
        spec = EngineSpec(cfg.optimizer, cfg.schedule, cfg.zero, cfg.precision, cfg.train.grad_clip, cfg.tf32)
        self.objective = self.task.objective()
        self.phases = phases_of(self.objective)  # its terms' curriculum phases (no-ops for a plain callable)
        self.engine, self.scheduler = build_engine(
            model, self.objective, spec, self.geometry, self.total_steps, load_universal=universal
        )
        self.feeder = DeviceFeeder(self.engine.device)  # pinned, non-blocking copies; leases released when done
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir, self.rank, self.world)
        record_rank_host(self.run_dir)  # <run>/ranks/rank<r>.json: host and Slurm node of this rank
        self.state = TrainState()
        if self.resume is not None:
            self.checkpoints.load(self.engine, self.resume, universal)
            self.state = dataclasses.replace(saved.progress)
            self.phases.load_state_dict(self.state.objective)
            self._say(
                f"resumed from {self.resume.path} at step {self.state.step} (saved by "
                f"{saved.world_size} ranks, now {self.world})"
            )
        self.evaluator = self.task.evaluator(self.geometry.per_rank, self.rank, self.world)
        from pretrain.config import save_config
        from pretrain.metrics import MetricsLogger

        self.metrics = MetricsLogger(cfg.metrics, self.run_dir, cfg.run.name, self.rank, self.env.local_rank)
        if self.metrics.url:
            print(
                f"metrics: rank {self.rank} serves Prometheus metrics at {self.metrics.url}",
                file=sys.stderr,
                flush=True,
            )
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        self.keys_file = None
        if cfg.train.record_keys:
            (self.run_dir / "keys").mkdir(parents=True, exist_ok=True)
            self.keys_file = open(self.run_dir / "keys" / f"rank{self.rank}.txt", "a", encoding="utf-8", buffering=1)

    def _total_steps(self, saved: RunState | None) -> int:
        if saved is not None:
            return saved.total_steps
        if self.cfg.train.steps:
            return self.cfg.train.steps
        total = self.cfg.train.epochs * self.loader.batches_per_epoch() // self.geometry.accumulation
        if total < 1:
            raise UserError(
                f"train: the data gives no optimizer step ({self.loader.batches_per_epoch()} batches "
                f"per rank per epoch, accumulation {self.geometry.accumulation}); set train.steps"
            )
        return total

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=sys.stderr, flush=True)

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> ExitCode:
        state, last = self.state, self.total_steps
        self._say(
            f"training {last} steps from step {state.step}: global batch {self.geometry.global_batch} = "
            f"{self.world} ranks x {self.geometry.per_rank} x {self.geometry.accumulation} accumulation, "
            f"ZeRO {self.cfg.zero.stage}, {self.cfg.precision}"
        )
        preempt = PreemptionFlag().install()
        stream = _data_stream(self.loader, state.epoch, state.cursor)
        meter = ThroughputMeter(state.step)
        try:
            with StepProfiler(self.cfg.profile, self.run_dir, self.rank, self.engine.device.type) as profiler:
                while state.step < last:
                    logs, count, finite = self.train_step(stream, meter)
                    stop = any_rank(preempt.received is not None)  # after the step: the signalled step is the last
                    self.account(logs, count, finite, meter)
                    profiler.step()  # the recorded steps hold the loop and its logging, not evaluation or saving
                    if self.evaluator is not None and self.evaluator.due(state.step, last):
                        self.evaluate()
                    if self.checkpoints.due(state.step, last, stop):
                        self.save()
                    if stop:
                        signame = signal.Signals(preempt.received).name if preempt.received else "a peer's signal"
                        self._say(
                            f"preempted ({signame}) at step {state.step}: checkpoint saved, "
                            f"exit {int(ExitCode.PREEMPTED)}"
                        )
                        return ExitCode.PREEMPTED
            return ExitCode.OK
        finally:
            preempt.restore()
            self.feeder.flush()  # the last batches' pixel leases go back to the loader's workers
            self.metrics.close()
            if self.keys_file is not None:
                self.keys_file.close()

    def train_step(
        self, stream: Iterator[tuple[int, dict[str, Any]]], meter: ThroughputMeter
    ) -> tuple[dict[str, Any], int, bool]:
        """`accumulation` micro-batches; returns (summed logs of the finite ones, their count, all finite).
        The logs stay tensors (on the device): reading them is a host-device sync each, so `account`
        reads them only on the steps it logs, all of them at once."""
        state = self.state
        logs_sum: dict[str, Any] = {}
        count, finite_all = 0, True
        for micro in range(self.geometry.accumulation):
            wait_start = _now()
            with record_function(DATA):
                state.epoch, batch = next(stream)
            meter.batch(int(batch["sample_mask"].sum()), _now() - wait_start)
            self._last_cursor = batch.get("cursor")
            if self.keys_file is not None:
                self.keys_file.write("".join(f"{state.epoch} {state.step} {k}\n" for k in batch["key"] if k))
            if batch.get("bad_samples"):
                self.metrics.add_bad_samples(batch["bad_samples"])
            with record_function(DATA):
                on_engine = to_engine(batch, self.engine, self.feeder)
            finite, logs = micro_step(
                self.engine,
                on_engine,
                Progress(state.step, self.total_steps),
                after_forward=testing_hooks.after_forward(
                    state.step + 1, last_micro_batch=micro == self.geometry.accumulation - 1
                ),
            )
            if not finite:
                finite_all = False
                continue
            count += 1
            for key, value in logs.items():  # tensors stay where they are: read only when a step is logged
                value = value.detach() if isinstance(value, torch.Tensor) else value
                logs_sum[key] = value if key not in logs_sum else logs_sum[key] + value
        meter.step()
        return logs_sum, count, finite_all

    def account(self, logs: dict[str, Any], count: int, finite: bool, meter: ThroughputMeter) -> None:
        """Count the step, log it when due, and stop (after saving) at the non-finite limit."""
        state, cfg = self.state, self.cfg
        state.step += 1
        state.samples += self.geometry.global_batch
        state.nonfinite_in_a_row = 0 if finite else state.nonfinite_in_a_row + 1
        state.nonfinite_total += 0 if finite else 1
        if not finite:
            self._say(
                f"step {state.step}: non-finite loss, skipped "
                f"({state.nonfinite_in_a_row} in a row, limit {cfg.train.max_nonfinite_steps})"
            )
        exhausted = state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps
        if state.step % cfg.train.log_every == 0 or state.step == self.total_steps or exhausted:
            for line in self.phases.observe(Progress(state.step, self.total_steps)):  # phases end here
                self._say(line)
            self.metrics.log_training(state.step, self.total_steps, as_floats(logs), count, meter, self._step_values())
        if exhausted:
            self.save()
            raise UserError(
                f"training stopped: {state.nonfinite_in_a_row} non-finite losses in a row "
                f"(train.max_nonfinite_steps); the last good state is saved in "
                f"{self.checkpoints.root}",
                ExitCode.NONFINITE,
            )

    def _step_values(self) -> dict[str, float]:
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "samples": float(self.state.samples),
            "lr": float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else self.cfg.optimizer.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "loss_scale": float(getattr(self.engine.optimizer, "cur_scale", 1.0) or 1.0),
            "nonfinite_steps": float(self.state.nonfinite_total),
        }

    def evaluate(self) -> dict[str, float]:
        results = self.evaluator.evaluate(self.engine, Progress(self.state.step, self.total_steps))
        self.metrics.log_eval(self.state.step, results)
        self._say(f"eval step {self.state.step}: " + " ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
        return results

    # --- checkpoints -----------------------------------------------------------------------------
    def save(self) -> None:
        """All ranks: merge the cursors, save; the metrics record the duration and outcome."""
        start = _now()
        ok = False
        try:
            cursors = all_gather_object(getattr(self, "_last_cursor", None))
            if all(c is not None for c in cursors):
                self.state.cursor = merge_rank_cursors(cursors)
            self.state.objective = self.phases.state_dict()
            run_state = RunState(
                progress=dataclasses.replace(self.state),
                total_steps=self.total_steps,
                global_batch=self.geometry.global_batch,
                task=self.task.name,
                config=to_dict(self.cfg),
                config_hash=config_hash(self.cfg),
                categories=getattr(self.task, "categories", None),
            )
            path = self.checkpoints.save(self.engine, self.state.step, run_state, self.tokenizer)
            ok = True
            self._say(f"checkpoint {path} ({_now() - start:.1f} s)")
        finally:
            self.metrics.checkpoint_saved(_now() - start, ok)


def _now() -> float:
    return time.perf_counter()


def train(cfg: "Config", env: Any, task: "Task | None" = None, resume: Resume | None = None) -> ExitCode:
    """Set up and run `task` (default: pretraining); `resume` comes from
    `pretrain.checkpoint.check_resume`, called once before the process group started."""
    if task is None:
        from pretrain.task import PretrainTask

        categories = resume.state.categories if resume is not None else None
        task = PretrainTask(cfg, categories=categories)  # a resumed run keeps its classes
    trainer = Trainer(cfg, env, task, resume)
    trainer.setup()
    return trainer.run()
