"""Retrieval finetuning as a task of the one training loop (pretrain.train): its model comes from a
pretraining run, a checkpoint or an export (`finetune.init`), its objective is the recipe, its
evaluator measures retrieval on the held-out set. Checkpoints, resume, launchers, preemption and
metrics are the loop's, unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from data_tools.loader import Loader
from finetune.candidates import CandidateStore
from finetune.hinge import HardNegativeHinge
from pretrain.evaluator import Evaluator, cadence_due
from pretrain.iais import IAISRegularizer
from pretrain.objectives import CompositeObjective, IAISTerm, Objective, Progress
from pretrain.task import new_model


class FinetuneTask:
    name = "finetune"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.ft = cfg.finetune
        self.regularizer: IAISRegularizer | None = None
        self.tokenizer: Any = None

    def train_loader(self, batch_size: int, rank: int, world_size: int) -> Loader:
        loader = Loader(
            dataclasses.replace(self.cfg.data, batch_size=batch_size), rank=rank, world_size=world_size, epoch=0
        )
        self.tokenizer = loader.tokenizer
        return loader

    def build_model(self, tokenizer: Any, fresh: bool, say: Callable[[str], None]) -> torch.nn.Module:
        model = new_model(self.cfg.model, tokenizer)
        if fresh and self.ft.init is not None:
            from pretrain.weights import copy_weights, find_model_weights

            source = find_model_weights(self.ft.init)
            copy_weights(model, source.state_dict(), source.path)
            say(f"finetune.init={self.ft.init}: weights of {source.path}")
        elif fresh and self.cfg.model.init_from is not None:
            from pretrain.model import load_hf_text_weights

            load_hf_text_weights(model, self.cfg.model.init_from)
        self.regularizer = IAISRegularizer.from_config(self.cfg.iais, model.config.iais_layer_count)
        if self.regularizer is not None:
            self.regularizer.attach(model)
        return model

    def objective(self) -> Objective:
        extra = [IAISTerm(self.regularizer)] if self.regularizer is not None else []
        if self.ft.recipe in ("itc_itm", "itc"):
            kept = ("itc", "itm") if self.ft.recipe == "itc_itm" else ("itc",)
            terms = {
                name: dataclasses.replace(section, enabled=name in kept and section.enabled)
                for name, section in self.cfg.objectives.terms.items()
            }
            sections = dataclasses.replace(self.cfg.objectives, sampling="joint", terms=terms)
            return CompositeObjective.from_sections(sections, extra)
        store = CandidateStore(self.cfg.data, self.tokenizer)
        return CompositeObjective([HardNegativeHinge(self.ft, store, self.cfg.data.seed), *extra])

    def evaluator(self, batch_size: int, rank: int, world_size: int) -> Evaluator | None:
        if not self.cfg.eval.every_steps:
            return None
        return RetrievalEvaluator(self.cfg, self.tokenizer)


class RetrievalEvaluator:
    """R@1/5/10 both ways (and relation sensitivity, ISD) on `eval.paths` inside the loop, every
    `eval.every_steps` and at the end, scored as `finetune.eval_mode`."""

    def __init__(self, cfg: Any, tokenizer: Any):
        self.cfg, self.tokenizer = cfg, tokenizer

    def due(self, step: int, last_step: int) -> bool:
        return cadence_due(self.cfg.eval.every_steps, step, last_step)

    def evaluate(self, engine: Any, progress: Progress) -> dict[str, float]:
        from finetune.evaluate import evaluate_model

        model = engine.module.model
        paths = self.cfg.eval.paths or self.cfg.data.paths
        was_training = model.training
        rng = torch.get_rng_state()
        try:
            with _gathered(engine):
                results = evaluate_model(
                    model.eval(),
                    self.tokenizer,
                    paths[0],
                    mode=self.cfg.finetune.eval_mode,
                    k=self.cfg.finetune.eval_k,
                    max_text_len=self.cfg.data.max_text_len,
                    trust=self.cfg.data.trust,
                )
        finally:
            torch.set_rng_state(rng)
            model.train(was_training)
        return {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}


def _gathered(engine: Any):
    """Every parameter whole for the duration (ZeRO 3 partitions them); a no-op below stage 3."""
    import contextlib

    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()
