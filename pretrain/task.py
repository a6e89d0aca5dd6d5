"""The task seam: what a run trains, given to the one training loop.

A task bundles what differs between pretraining and finetuning; the loop (pretrain.train) owns
everything else (engine, checkpoints, resume, preemption, metrics, launchers):

    loader = task.train_loader(per_rank_batch, rank, world)      # its batches (and so its batch kind)
    model = task.build_model(loader.tokenizer, fresh, say)       # weights a fresh run starts from
    objective = task.objective()                                 # objective(model, batch, progress)
    evaluator = task.evaluator(per_rank_batch, rank, world)      # due(step, last) / evaluate(...), or None

`build_model` is also where the task tells the model what its objective needs from it (the IAIS
regulariser attaches its layers: the one owner of that decision), and where the objective's own
heads are built (right after the model, from the same seed on every rank: see
pretrain.objectives.base).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import torch

from data_tools.loader import Loader
from pretrain.evaluator import Evaluator, HeldOutEvaluator
from pretrain.iais import IAISRegularizer
from data_tools.manifest import category_vocabulary
from pretrain.objectives import CompositeObjective, Objective, pretraining_objective


class Task(Protocol):
    name: str

    def train_loader(self, batch_size: int, rank: int, world_size: int) -> Loader: ...

    def build_model(self, tokenizer: Any, fresh: bool, say: Callable[[str], None]) -> torch.nn.Module: ...

    def objective(self) -> Objective: ...

    def evaluator(self, batch_size: int, rank: int, world_size: int) -> Evaluator | None: ...


def new_model(model_config: Any, tokenizer: Any) -> torch.nn.Module:
    """A freshly initialised model of `model.architecture` sized to the tokenizer's vocabulary."""
    from pretrain.model import build_model

    return build_model(dataclasses.replace(model_config, vocab_size=len(tokenizer)))


class PretrainTask:
    """ITC + ITM + MLM (+ IAIS) over the `data` stream, held-out losses as evaluation."""

    name = "pretrain"

    def __init__(self, cfg: Any, categories: list[str] | None = None):
        self.cfg = cfg
        self.regularizer: IAISRegularizer | None = None
        self._objective: CompositeObjective | None = None
        self.categories: list[str] = list(categories) if categories is not None else category_vocabulary(cfg.data.paths)
        """Box label -> class (the index): the datasets' vocabulary, or on a resume the checkpoint's, so
        that heads trained on those classes (MRC) keep their meaning when data.paths changes; labels
        outside it get class -1 (no target). Saved in every checkpoint."""

    def train_loader(self, batch_size: int, rank: int, world_size: int) -> Loader:
        return Loader(
            dataclasses.replace(self.cfg.data, batch_size=batch_size),
            rank=rank,
            world_size=world_size,
            epoch=0,
            categories=self.categories,
        )

    def build_model(self, tokenizer: Any, fresh: bool, say: Callable[[str], None]) -> torch.nn.Module:
        model = new_model(self.cfg.model, tokenizer)
        if self.cfg.model.init_from is not None and fresh:
            # A fresh start only: a resumed run's checkpoint holds every weight. Every rank loads the
            # same files before the engine exists (ZeRO 3 partitions the loaded weights).
            from pretrain.model import load_hf_text_weights

            loaded = load_hf_text_weights(model, self.cfg.model.init_from)
            say(f"model.init_from={self.cfg.model.init_from}: {len(loaded)} text tensors loaded")
        self.regularizer = IAISRegularizer.from_config(self.cfg.iais, model.config.iais_layer_count)
        if self.regularizer is not None:
            self.regularizer.attach(model)
        self._objective = pretraining_objective(self.cfg.objectives, self.regularizer, self.cfg.train.seed)
        unknown = sorted(set(category_vocabulary(self.cfg.data.paths)) - set(self.categories))
        if unknown:
            say(
                f"data: {len(unknown)} box labels are not among the run's {len(self.categories)} categories (kept "
                f"from its checkpoint), e.g. {unknown[0]!r}: their boxes have no class"
            )
        self._objective.build_heads(model.config, self.categories)
        self._objective.bind_text(tokenizer, self.categories)
        return model

    def objective(self) -> Objective:
        if self._objective is None:  # a caller that never built the model: no heads to build
            self._objective = pretraining_objective(self.cfg.objectives, self.regularizer, self.cfg.train.seed)
        return self._objective

    def evaluator(self, batch_size: int, rank: int, world_size: int) -> Evaluator | None:
        if not self.cfg.eval.every_steps:
            return None
        return HeldOutEvaluator(self.cfg.eval, self.cfg.data, batch_size, rank, world_size, self.categories)
