"""Objectives of the one training loop: the term registry and the built-in terms.

    objective = pretraining_objective(cfg.objectives, regularizer)   # ITC + ITM + IAIS + MLM (+ tags, MRM, WRA)
    out = objective(model, batch, Progress(step, total_steps))       # out.total, out.logs

A new term is one module (see `base.py`); finetuning adds its own (the hinge) the same way.
"""

from __future__ import annotations

from .base import (
    TERMS,
    Objective,
    ObjectiveOutput,
    Progress,
    StepContext,
    Term,
    TermConfig,
    image_id_codes,
    import_plugins,
    masked_mean,
    phases_of,
    register,
    wide,
)
from .composite import CompositeObjective, sampled_term
from .config import ObjectivesConfig, build_sections
from .iais_term import IAISTerm
from .itc import ITC, ITCConfig, itc_loss
from .itm import ITM, ITMConfig, sample_hard_negatives
from .mlm import MLM, MLMConfig
from .mrm import MRM, MRMConfig
from .position import Position, PositionConfig
from .tags import Tags, TagsConfig
from .wra import WRA, WRAConfig, ipot_transport, wra_distance

__all__ = [
    "TERMS",
    "CompositeObjective",
    "Objective",
    "ObjectiveOutput",
    "Progress",
    "StepContext",
    "Term",
    "TermConfig",
    "build_sections",
    "image_id_codes",
    "import_plugins",
    "masked_mean",
    "phases_of",
    "register",
    "wide",
    "IAISTerm",
    "ITC",
    "ITCConfig",
    "itc_loss",
    "ITM",
    "ITMConfig",
    "sample_hard_negatives",
    "MLM",
    "MLMConfig",
    "MRM",
    "MRMConfig",
    "Position",
    "PositionConfig",
    "Tags",
    "TagsConfig",
    "WRA",
    "WRAConfig",
    "ipot_transport",
    "wra_distance",
    "sampled_term",
    "ObjectivesConfig",
    "pretraining_objective",
]


def pretraining_objective(sections: ObjectivesConfig, regularizer=None, seed: int = 0) -> CompositeObjective:
    """The enabled terms of `objectives` plus IAIS when a regulariser is given (it exists only when
    `iais.enabled`); `seed` (train.seed) draws the term of a step under `objectives.sampling=per_batch`."""
    return CompositeObjective.from_sections(sections, [IAISTerm(regularizer)] if regularizer is not None else [], seed)
