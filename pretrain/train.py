"""The one training loop: data -> objective -> DeepSpeed step, with checkpoints, validation,
non-finite handling and preemption.

    code = train(cfg, env, objective=None)   # ExitCode: OK, PREEMPTED, NONFINITE

Per optimizer step every rank consumes `accumulation` micro-batches from its loader (equal counts per
rank, so no rank waits at a collective), runs the objective and the engine's backward/step. Two
flags are agreed by one all-reduce per micro-batch: "this loss is not finite" (every rank then skips
that backward, so ranks never disagree about a step) and "a SIGTERM/SIGUSR1 arrived" (every rank
finishes the step, saves and exits with ExitCode.PREEMPTED, 75: resume me).
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from data_tools.errors import ExitCode, UserError
from data_tools.loader import Loader, merge_rank_cursors
from pretrain.checkpoint import CheckpointManager, convert_to_universal, read_client_state, resolve_resume
from pretrain.config import Config, config_hash, resume_differences, save_config, to_dict
from pretrain.engine import BatchGeometry, batch_geometry, build_engine
from pretrain.objectives import Objective, Progress, PretrainObjective, image_id_codes
from pretrain.preemption import PreemptionFlag


# --- small helpers -------------------------------------------------------------------------------
def _all_reduce(values: list[float], op: Any = None) -> list[float]:
    """Sum (or `op`) a few floats over ranks; the identity on one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def _all_gather_object(obj: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _model_dtype(engine: Any) -> torch.dtype:
    return next(engine.module.parameters()).dtype  # ZeRO 3 partitions keep their dtype


def _to_engine(batch: dict[str, Any], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The batch on the engine's device, floating tensors in the model's dtype (bf16/fp16 engines
    hold half weights). Lists of tensors (per-sample boxes) move too; other values stay as they are."""
    def move(v: Any) -> Any:
        if torch.is_tensor(v):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, non_blocking=True)
        if isinstance(v, list) and v and all(torch.is_tensor(x) for x in v):
            return [move(x) for x in v]
        return v
    return {k: move(v) for k, v in batch.items()}


def micro_step(engine: Any, batch: dict[str, Any], progress: Progress, stop_requested: bool
               ) -> tuple[bool, bool, dict[str, torch.Tensor]]:
    """One micro-batch on every rank: forward (the objective), agree, backward, step.

    One all-reduce (MAX) agrees on two flags: a non-finite loss on any rank makes every rank skip
    this micro-batch's backward, so no rank steps alone; a preemption signal on any rank stops all.
    DeepSpeed counts micro-steps in step() and updates at the boundary, so a skipped micro-batch just
    drops out: an update is made from every `accumulation` finite micro-batches (with accumulation 1
    the optimizer step is skipped). Returns (finite, stop, logs).
    """
    total, logs = engine(batch, progress)
    bad, stop = _all_reduce([0.0 if torch.isfinite(total).item() else 1.0, 1.0 if stop_requested else 0.0],
                            dist.ReduceOp.MAX if dist.is_initialized() else None)
    if bad > 0:
        return False, stop > 0, logs
    engine.backward(total)
    engine.step()
    return True, stop > 0, logs


@dataclasses.dataclass
class TrainState:
    """Where the run stands: saved in every checkpoint's client state."""

    step: int = 0
    epoch: int = 0
    cursor: dict[str, Any] | None = None
    """The global data cursor (merged over ranks) after the last consumed micro-batch."""
    samples: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0


def check_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from (None: a fresh start); UserError when it cannot continue this
    run: missing, incomplete, or trained with a configuration that differs beyond RESUME_MUTABLE."""
    path = resolve_resume(cfg.resume, cfg.run.path)
    if path is None:
        return None
    diffs = resume_differences(read_client_state(path)["config"], cfg)
    if diffs:
        raise UserError(f"resume: {path} was trained with a different configuration; only the world size and "
                        f"the fields in pretrain.config.RESUME_MUTABLE may change: {'; '.join(diffs)}")
    return path


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
    """Builds the run's parts from a Config and runs the loop; `run()` returns the exit code."""

    def __init__(self, cfg: Config, env: Any, objective: Objective | None = None):
        self.cfg, self.env = cfg, env
        self.rank, self.world = env.rank, env.world_size
        self.run_dir = cfg.run.path
        self.objective_override = objective
        self.log = sys.stderr

    # --- setup -----------------------------------------------------------------------------------
    def _resume_source(self) -> tuple[Path | None, dict[str, Any] | None]:
        path = check_resume(self.cfg)
        return (path, read_client_state(path)) if path is not None else (None, None)

    def setup(self) -> None:
        cfg = self.cfg
        # DeepSpeed 0.19.8 calls deprecated c10d functions every step: one warning per call otherwise.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        self.resume_path, saved = self._resume_source()
        geometry = batch_geometry(cfg, self.world, saved["global_batch"] if saved else None)
        self.geometry: BatchGeometry = geometry
        data_cfg = dataclasses.replace(cfg.data, batch_size=geometry.per_rank)
        self.loader = Loader(data_cfg, rank=self.rank, world_size=self.world, epoch=0)
        self.tokenizer = self.loader.tokenizer
        model_cfg = dataclasses.replace(cfg.model, vocab_size=len(self.tokenizer))
        from pretrain.model import RelAlignModel

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = RelAlignModel(model_cfg)
        if cfg.model.init_from is not None and not saved:
            # A fresh start only: a resumed run's checkpoint holds every weight. Every rank loads the
            # same files before the engine exists (ZeRO 3 partitions the loaded weights).
            from pretrain.model import load_hf_text_weights

            loaded = load_hf_text_weights(model, cfg.model.init_from)
            self._say(f"model.init_from={cfg.model.init_from}: {len(loaded)} text tensors loaded")
        torch.manual_seed(cfg.train.seed + 1000 * (self.rank + 1))  # per-rank dropout / sampling streams
        if saved:
            self.total_steps = int(saved["total_steps"])
        elif cfg.train.steps:
            self.total_steps = cfg.train.steps
        else:
            self.total_steps = cfg.train.epochs * self.loader.batches_per_epoch() // geometry.accumulation
        if self.total_steps < 1:
            raise UserError(f"train: the data gives no optimizer step ({self.loader.batches_per_epoch()} batches "
                            f"per rank per epoch, accumulation {geometry.accumulation}); set train.steps")
        self.objective = self.objective_override or self._default_objective(model)
        universal = bool(saved) and saved["world_size"] != self.world and cfg.zero.stage > 0
        if universal:
            convert_to_universal(self.resume_path, self.rank)
        self.engine, self.scheduler = build_engine(model, self.objective, cfg, geometry, self.total_steps,
                                                   load_universal=universal)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, self.rank, self.world)
        self.state = TrainState()
        if self.resume_path is not None:
            client = self.checkpoints.load(self.engine, self.resume_path, universal)
            self.state = TrainState(step=client["step"], epoch=client["epoch"], cursor=client["cursor"],
                                    samples=client["samples"], nonfinite_total=client.get("nonfinite_total", 0))
            self._say(f"resumed from {self.resume_path} at step {self.state.step} (saved by "
                      f"{client['world_size']} ranks, now {self.world})")
        from pretrain.metrics import MetricsLogger

        self.metrics = MetricsLogger(cfg.metrics, self.run_dir, cfg.run.name, self.rank, self.env.local_rank)
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        self.keys_file = None
        if cfg.train.record_keys:
            (self.run_dir / "keys").mkdir(parents=True, exist_ok=True)
            self.keys_file = open(self.run_dir / "keys" / f"rank{self.rank}.txt", "a", encoding="utf-8", buffering=1)

    def _default_objective(self, model: Any) -> Objective:
        from pretrain.iais import IAISRegularizer

        regularizer = None
        if self.cfg.iais.enabled:
            regularizer = IAISRegularizer(self.cfg.iais, model.config.num_layers)
            model.set_iais_layers(regularizer.layers)
        return PretrainObjective(self.cfg.objectives, regularizer)

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=self.log, flush=True)

    # --- checkpoints -----------------------------------------------------------------------------
    def save(self, last_cursor: dict[str, Any] | None) -> None:
        """All ranks: merge the cursors, save; logs the duration."""
        start = time.perf_counter()
        ok = False
        try:
            cursors = _all_gather_object(last_cursor)
            if all(c is not None for c in cursors):
                self.state.cursor = merge_rank_cursors(cursors)
            client = {
                "step": self.state.step, "epoch": self.state.epoch, "cursor": self.state.cursor,
                "samples": self.state.samples, "nonfinite_total": self.state.nonfinite_total,
                "total_steps": self.total_steps, "global_batch": self.geometry.global_batch,
                "scheduler_step": self.scheduler.last_epoch if self.scheduler is not None else None,
                "iais_position": {"step": self.state.step, "total_steps": self.total_steps},
                "config": to_dict(self.cfg), "config_hash": config_hash(self.cfg),
            }
            path = self.checkpoints.save(self.engine, self.state.step, client, self.tokenizer)
            ok = True
            self._say(f"checkpoint {path} ({time.perf_counter() - start:.1f} s)")
        finally:
            self.metrics.checkpoint_saved(time.perf_counter() - start, ok)

    # --- validation ------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Held-out losses (mean over `eval.batches` batches per rank and all ranks), optional R@1."""
        cfg = self.cfg
        if not hasattr(self, "eval_loader"):
            paths = cfg.eval.paths or cfg.data.paths
            eval_cfg = dataclasses.replace(cfg.data, paths=list(paths), train=False, batch_size=self.geometry.per_rank)
            self.eval_loader = Loader(eval_cfg, rank=self.rank, world_size=self.world, epoch=0)
        was_training = self.engine.module.training
        self.engine.eval()
        sums: dict[str, float] = {}
        count = 0
        text_embs, image_embs, ids = [], [], []
        rng = torch.get_rng_state()  # validation must not move the training RNG streams
        try:
            with torch.no_grad():
                self.eval_loader.set_epoch(0)
                for i, batch in enumerate(self.eval_loader):
                    if i >= cfg.eval.batches:
                        break
                    batch = _to_engine(batch, _model_dtype(self.engine), self.engine.device)
                    _, logs = self.engine(batch, Progress(self.state.step, self.total_steps))
                    for key, value in logs.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                    count += 1
                    if cfg.eval.retrieval_probe:
                        keep = batch["sample_mask"]
                        text_emb, image_emb = self.engine(batch, None, embed=True)  # [B, E] each
                        text_embs.append(text_emb[keep].float())
                        image_embs.append(image_emb[keep].float())
                        ids += [s for s, k in zip(batch["image_id"], keep.tolist()) if k]
        finally:
            torch.set_rng_state(rng)
            self.engine.train(was_training)
        keys = sorted(sums)
        totals = _all_reduce([sums[k] for k in keys] + [float(count)])
        results = {k: v / max(totals[-1], 1.0) for k, v in zip(keys, totals[:-1])}
        if cfg.eval.retrieval_probe:
            results.update(self._recall_at_1(text_embs, image_embs, ids))
        return results

    def _recall_at_1(self, text_embs: list, image_embs: list, ids: list[str]) -> dict[str, float]:
        gathered = _all_gather_object((torch.cat(text_embs) if text_embs else torch.zeros(0, 1),
                                       torch.cat(image_embs) if image_embs else torch.zeros(0, 1), ids))
        text = torch.cat([g[0] for g in gathered if len(g[2])])  # [N, E]
        image = torch.cat([g[1] for g in gathered if len(g[2])])  # [N, E]
        all_ids = [i for g in gathered for i in g[2]]
        if not all_ids:
            return {}
        codes = image_id_codes(all_ids)
        sim = text @ image.T  # [N texts, N images]; one image per caption row, duplicates allowed
        t2i = (codes[sim.argmax(dim=1)] == codes).float().mean().item()
        i2t = (codes[sim.argmax(dim=0)] == codes).float().mean().item()
        return {"recall/t2i@1": t2i, "recall/i2t@1": i2t}

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> ExitCode:
        cfg = self.cfg
        state = self.state
        engine = self.engine
        dtype = _model_dtype(engine)
        preempt = PreemptionFlag().install()
        stream = _data_stream(self.loader, state.epoch, state.cursor)
        accumulation = self.geometry.accumulation
        last_cursor: dict[str, Any] | None = None
        window = {"start": time.perf_counter(), "samples": 0, "wait": 0.0, "steps": 0}
        run_start, start_step = time.perf_counter(), state.step
        exit_code = ExitCode.OK
        self._say(f"training {self.total_steps} steps from step {state.step}: global batch "
                  f"{self.geometry.global_batch} = {self.world} ranks x {self.geometry.per_rank} x "
                  f"{accumulation} accumulation, ZeRO {cfg.zero.stage}, {cfg.precision}")
        try:
            while state.step < self.total_steps:
                step_start = time.perf_counter()
                logs_sum: dict[str, float] = {}
                backwards, nonfinite, stop = 0, False, False
                for _ in range(accumulation):
                    wait_start = time.perf_counter()
                    state.epoch, batch = next(stream)
                    window["wait"] += time.perf_counter() - wait_start
                    last_cursor = batch.get("cursor")
                    if self.keys_file is not None:
                        self.keys_file.write("".join(f"{state.epoch} {state.step} {k}\n" for k in batch["key"] if k))
                    if batch.get("bad_samples"):
                        self.metrics.add_bad_samples(batch["bad_samples"])
                    finite, stop_flag, logs = micro_step(engine, _to_engine(batch, dtype, engine.device),
                                                         Progress(state.step, self.total_steps),
                                                         preempt.received is not None)
                    stop = stop or stop_flag
                    window["samples"] += int(batch["sample_mask"].sum())
                    if not finite:
                        nonfinite = True
                        continue
                    backwards += 1
                    for key, value in logs.items():
                        logs_sum[key] = logs_sum.get(key, 0.0) + float(value)
                state.step += 1
                state.samples += self.geometry.global_batch
                if nonfinite:
                    state.nonfinite_in_a_row += 1
                    state.nonfinite_total += 1
                    self._say(f"step {state.step}: non-finite loss, skipped "
                              f"({state.nonfinite_in_a_row} in a row, limit {cfg.train.max_nonfinite_steps})")
                else:
                    state.nonfinite_in_a_row = 0
                window["steps"] += 1
                step_seconds = time.perf_counter() - step_start
                if state.step % cfg.train.log_every == 0 or state.step == self.total_steps:
                    self._log_step(logs_sum, max(backwards, 1), window, step_seconds, run_start, start_step)
                if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    if state.step % cfg.train.log_every:  # the stopping step is always recorded
                        self._log_step(logs_sum, max(backwards, 1), window, step_seconds, run_start, start_step)
                    self.save(last_cursor)
                    raise UserError(f"training stopped: {state.nonfinite_in_a_row} non-finite losses in a row "
                                    f"(train.max_nonfinite_steps); the last good state is saved in "
                                    f"{self.checkpoints.root}", ExitCode.NONFINITE)
                if cfg.train.eval_every and (state.step % cfg.train.eval_every == 0 or state.step == self.total_steps):
                    results = self.validate()
                    self.metrics.log_eval(state.step, results)
                    self._say(f"eval step {state.step}: " + " ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
                every = cfg.checkpoint.every_steps
                if stop:
                    self.save(last_cursor)
                    signame = signal.Signals(preempt.received).name if preempt.received else "a peer's signal"
                    self._say(f"preempted ({signame}) at step {state.step}: checkpoint saved, exit {int(ExitCode.PREEMPTED)}")
                    exit_code = ExitCode.PREEMPTED
                    break
                if state.step == self.total_steps:
                    if cfg.checkpoint.at_end or every:
                        self.save(last_cursor)
                elif every and state.step % every == 0:
                    self.save(last_cursor)
        finally:
            preempt.restore()
            self.metrics.close()
            if self.keys_file is not None:
                self.keys_file.close()
        return exit_code

    def _log_step(self, logs_sum: dict[str, float], count: int, window: dict[str, Any], step_seconds: float,
                  run_start: float, start_step: int) -> None:
        """Metrics record and progress line; averages over ranks (one all-reduce per log interval)."""
        state = self.state
        keys = sorted(logs_sum)
        reduced = _all_reduce([logs_sum[k] / count for k in keys] + [float(window["samples"]), window["wait"]])
        values = {k: v / self.world for k, v in zip(keys, reduced[: len(keys)])}
        elapsed = time.perf_counter() - window["start"]
        samples_window, wait = reduced[len(keys)], reduced[len(keys) + 1] / self.world
        grad_norm = self.engine.get_global_grad_norm()
        values.update({
            "samples": float(state.samples),
            "samples_per_second": samples_window / max(elapsed, 1e-9),
            "step_seconds": elapsed / max(window["steps"], 1),
            "data_wait_seconds": wait / max(window["steps"], 1),
            "lr": float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else self.cfg.optimizer.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "loss_scale": float(getattr(self.engine.optimizer, "cur_scale", 1.0) or 1.0),
            "nonfinite_steps": float(state.nonfinite_total),
        })
        self.metrics.log_step(state.step, values)
        done = state.step - start_step
        rate = done / max(time.perf_counter() - run_start, 1e-9)
        eta = (self.total_steps - state.step) / rate if rate > 0 else float("inf")
        losses = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in values.items() if k.startswith("loss/"))
        self._say(f"step {state.step}/{self.total_steps} | {losses} | {values['samples_per_second']:.1f} samples/s | "
                  f"data wait {100 * wait / max(elapsed, 1e-9):.0f}% | eta {_hms(eta)}")
        window.update(start=time.perf_counter(), samples=0, wait=0.0, steps=0)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(cfg: Config, env: Any, objective: Objective | None = None) -> ExitCode:
    """Set up and run; returns the exit code (OK, PREEMPTED) or raises UserError (NONFINITE, ...)."""
    trainer = Trainer(cfg, env, objective)
    trainer.setup()
    return trainer.run()
