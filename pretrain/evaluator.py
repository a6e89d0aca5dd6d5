"""Evaluation inside the loop: the evaluator decides when a step evaluates and does it.

    evaluator = HeldOutEvaluator(cfg.eval, data_cfg, rank, world)
    if evaluator.due(step, last_step):
        results = evaluator.evaluate(engine, Progress(step, total_steps))   # same keys on every rank

The pretraining evaluator measures held-out losses (the task's objective in eval mode, mean over
`eval.batches` batches per rank and over ranks) and, optionally, an in-batch R@1 probe by ITC.
A task may bring another evaluator (finetuning: retrieval recalls); anything with `due` and
`evaluate` fits. Evaluation never moves the training RNG streams.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from data_tools.errors import check
from data_tools.loader import DataConfig, Loader
from data_tools.manifest import category_vocabulary
from pretrain.distributed import all_gather_object, all_reduce_floats, gather_uneven
from pretrain.engine import to_engine
from pretrain.objectives import Progress, image_id_codes


@dataclasses.dataclass
class EvalConfig:
    """Validation inside the loop: when, on what, and an optional R@1 probe by ITC."""

    every_steps: int = 0
    """Steps between validations (and one at the end); 0 disables validation."""
    paths: list[str] = dataclasses.field(default_factory=list)
    """Validation dataset folders; empty = the training folders read in eval mode."""
    batches: int = 4
    """Batches per rank for the held-out losses."""
    retrieval_probe: bool = False
    """Also compute text->image and image->text R@1 by ITC on the validation batches."""

    def __post_init__(self) -> None:
        check("eval.every_steps", self.every_steps, self.every_steps >= 0, "an integer >= 0 (0 = off)")
        check("eval.batches", self.batches, self.batches >= 1, "an integer >= 1")


class Evaluator(Protocol):
    def due(self, step: int, last_step: int) -> bool: ...

    def evaluate(self, engine: Any, progress: Progress) -> dict[str, float]: ...


def cadence_due(every: int, step: int, last_step: int) -> bool:
    """Every `every` steps and at the last step; never when `every` is 0."""
    return bool(every) and (step % every == 0 or step >= last_step)


class HeldOutEvaluator:
    """Held-out losses of the run's objective and an optional ITC R@1 probe."""

    def __init__(
        self,
        config: EvalConfig,
        data: DataConfig,
        batch_size: int,
        rank: int,
        world_size: int,
        categories: list[str] | None = None,
    ):
        self.config = config
        self._data = dataclasses.replace(
            data, paths=list(config.paths or data.paths), train=False, batch_size=batch_size
        )
        self._categories = category_vocabulary(data.paths) if categories is None else categories  # the run's (MRC)
        self.rank, self.world_size = rank, world_size
        self._loader: Loader | None = None

    def due(self, step: int, last_step: int) -> bool:
        return cadence_due(self.config.every_steps, step, last_step)

    def evaluate(self, engine: Any, progress: Progress) -> dict[str, float]:
        if self._loader is None:
            self._loader = Loader(
                self._data, rank=self.rank, world_size=self.world_size, epoch=0, categories=self._categories
            )
        was_training = engine.module.training
        engine.eval()
        sums: dict[str, float] = {}
        count = 0
        text_embs, image_embs, ids = [], [], []
        rng = torch.get_rng_state()
        try:
            with torch.no_grad():
                self._loader.set_epoch(0)
                for i, batch in enumerate(self._loader):
                    if i >= self.config.batches:
                        break
                    batch = to_engine(batch, engine)
                    _, logs = engine(batch, progress)
                    for key, value in logs.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                    count += 1
                    if self.config.retrieval_probe:
                        keep = batch["sample_mask"]
                        text_emb, image_emb = engine(batch, None, embed=True)  # [B, E] each
                        text_embs.append(text_emb[keep].float())
                        image_embs.append(image_emb[keep].float())
                        ids += [s for s, k in zip(batch["image_id"], keep.tolist()) if k]
        finally:
            torch.set_rng_state(rng)
            engine.train(was_training)
        keys = sorted(sums)
        totals = all_reduce_floats([sums[k] for k in keys] + [float(count)])
        results = {k: v / max(totals[-1], 1.0) for k, v in zip(keys, totals[:-1])}
        if self.config.retrieval_probe:
            results.update(in_batch_recall_at_1(text_embs, image_embs, ids))
        return results


def in_batch_recall_at_1(text_embs: list, image_embs: list, ids: list[str]) -> dict[str, float]:
    """R@1 both ways by ITC cosine over the validation batches of every rank (one image per caption
    row; another caption of the same image counts as a hit). The embeddings travel by tensor
    collectives on the backend's device, the ids as objects: a pickled CUDA tensor would unpickle
    onto the sender's GPU. Every rank evaluated the same number of batches (at least one, or none)."""
    all_ids = [i for part in all_gather_object(ids) for i in part]
    if not all_ids:
        return {}
    text = gather_uneven(torch.cat(text_embs))  # [N, E], rank order like all_ids
    image = gather_uneven(torch.cat(image_embs))  # [N, E]
    codes = image_id_codes(all_ids).to(text.device)
    sim = text @ image.T  # [N texts, N images]
    t2i = (codes[sim.argmax(dim=1)] == codes).float().mean().item()
    i2t = (codes[sim.argmax(dim=0)] == codes).float().mean().item()
    return {"recall/t2i@1": t2i, "recall/i2t@1": i2t}
