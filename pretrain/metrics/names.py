"""The one table of metric series: Prometheus name, type, labels, and which logged key feeds each.

The trainer logs plain dicts of records of a `kind` (train, eval, checkpoint, bad_samples; see
pretrain/metrics/base.py). `ROUTES` says, for each kind, which key reaches which series and how its
labels are read from the key; `route(kind, key)` parses a key once (cached) so an exporter never
slices strings. Names follow DESIGN.md 3: prefix `relalign_`, base units, `_total` counters,
`_seconds`; every series also carries `rank` and `run`.

    relalign_steps_total                              optimiser steps done (counter)
    relalign_samples_total                            samples consumed, the trainer's cumulative count (counter)
    relalign_loss{objective}                          last training loss: every `loss/<name>` key (itc, itm,
                                                      mlm, iais, hinge, total, or a plugin term's name)
    relalign_samples_per_second                       throughput over the last logging interval
    relalign_step_seconds                             mean wall time of a step in the interval
    relalign_data_wait_seconds                        mean time a step waited for its batch
    relalign_learning_rate                            learning rate of the first parameter group
    relalign_grad_norm                                global gradient norm before clipping
    relalign_loss_scale                               dynamic loss scale (fp16; 1 otherwise)
    relalign_iais_weight                              lambda * s(p), the IAIS weight in force
    relalign_mining_seconds                           hard-negative mining time per micro-batch (finetuning)
    relalign_mining_candidates_per_second             candidates scored per second while mining (finetuning)
    relalign_nonfinite_steps_total                    steps skipped for a non-finite loss (counter)
    relalign_last_step_timestamp_seconds              Unix time of the last logged step (stall alerts)
    relalign_bad_samples_total{reason}                bad samples skipped by the loader (counter)
    relalign_checkpoint_duration_seconds              wall time of the last checkpoint save
    relalign_checkpoint_last_success_timestamp_seconds  Unix time of the last successful save
    relalign_checkpoints_total{outcome}               saves by outcome ok|failed (counter)
    relalign_eval_loss{objective}                     held-out losses
    relalign_eval_recall_ratio{direction,k}           retrieval recall R@k, t2i|i2t, k 1|5|10 (0..1)
    relalign_isd{direction,phase}                     IAIS symmetric KL, direction L|V, phase train|eval
    relalign_eval_relation_accuracy_ratio{kind}       relation sensitivity: true caption scored above its negative
    relalign_eval_isda                                ISDa over the annotated evaluation pairs
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

from data_tools.errors import BAD_SAMPLE_REASONS

BASE_LABELS = ("rank", "run")
TRAIN, EVAL, CHECKPOINT, BAD_SAMPLES = "train", "eval", "checkpoint", "bad_samples"
KINDS = (TRAIN, EVAL, CHECKPOINT, BAD_SAMPLES)

# How a routed value changes its series.
SET = "set"  # gauge = value
TOTAL = "total"  # value is a cumulative count: the counter moves by its increase
OUTCOME = "outcome"  # one event: the counter labelled ok|failed by the value's truth moves by 1
TIME = "time"  # gauge = the record's Unix time
TIME_IF_TRUE = "time_if_true"  # gauge = the record's Unix time when the value is true


@dataclasses.dataclass(frozen=True)
class Series:
    """One Prometheus series family."""

    name: str
    doc: str
    counter: bool = False
    labels: tuple[str, ...] = ()
    """Labels beyond `rank` and `run`."""
    gap: bool = False
    """A label set logged before but absent from a later record of its kind reads NaN (no stale value)."""


def _gauge(name: str, doc: str, *labels: str, gap: bool = False) -> Series:
    return Series(name, doc, labels=labels, gap=gap)


def _counter(name: str, doc: str, *labels: str) -> Series:
    return Series(name, doc, counter=True, labels=labels)


STEPS = _counter("relalign_steps_total", "Optimiser steps done.")
SAMPLES = _counter("relalign_samples_total", "Samples consumed: the trainer's cumulative count.")
LOSS = _gauge("relalign_loss", "Last logged training loss by objective.", "objective", gap=True)
SAMPLES_PER_SECOND = _gauge("relalign_samples_per_second", "Samples per second over the last logging interval.")
STEP_SECONDS = _gauge("relalign_step_seconds", "Mean wall time of one optimiser step in the last interval.")
DATA_WAIT = _gauge("relalign_data_wait_seconds", "Mean time a step waited for its batch in the last interval.")
LEARNING_RATE = _gauge("relalign_learning_rate", "Learning rate of the first parameter group.")
GRAD_NORM = _gauge("relalign_grad_norm", "Global gradient norm before clipping.")
LOSS_SCALE = _gauge("relalign_loss_scale", "Dynamic loss scale (fp16); 1 in bf16 and fp32.")
IAIS_WEIGHT = _gauge("relalign_iais_weight", "IAIS weight lambda * s(p) in force at this step.")
MINING_SECONDS = _gauge("relalign_mining_seconds", "Hard-negative mining time per micro-batch (finetuning).")
MINING_RATE = _gauge(
    "relalign_mining_candidates_per_second", "Candidates scored per second by hard-negative mining (finetuning)."
)
NONFINITE = _counter("relalign_nonfinite_steps_total", "Steps skipped because the loss was not finite.")
LAST_STEP_TIME = _gauge("relalign_last_step_timestamp_seconds", "Unix time of the last logged step.")
BAD = _counter("relalign_bad_samples_total", "Bad samples skipped by the loader.", "reason")
CHECKPOINT_SECONDS = _gauge("relalign_checkpoint_duration_seconds", "Wall time of the last checkpoint save.")
CHECKPOINT_SUCCESS = _gauge(
    "relalign_checkpoint_last_success_timestamp_seconds", "Unix time of the last successful checkpoint save."
)
CHECKPOINTS = _counter("relalign_checkpoints_total", "Checkpoint saves by outcome.", "outcome")
EVAL_LOSS = _gauge("relalign_eval_loss", "Held-out loss by objective.", "objective")
RECALL = _gauge("relalign_eval_recall_ratio", "Retrieval recall R@k (0..1).", "direction", "k")
ISD = _gauge("relalign_isd", "IAIS symmetric KL (ISD) by direction.", "direction", "phase")
RELATION = _gauge(
    "relalign_eval_relation_accuracy_ratio",
    "Share of (image, caption, negative) triples scored right, by negative kind.",
    "kind",
)
ISDA = _gauge("relalign_eval_isda", "ISDa: phrase-level relation disagreement on annotated pairs.")

SERIES = (
    STEPS,
    SAMPLES,
    LOSS,
    SAMPLES_PER_SECOND,
    STEP_SECONDS,
    DATA_WAIT,
    LEARNING_RATE,
    GRAD_NORM,
    LOSS_SCALE,
    IAIS_WEIGHT,
    MINING_SECONDS,
    MINING_RATE,
    NONFINITE,
    LAST_STEP_TIME,
    BAD,
    CHECKPOINT_SECONDS,
    CHECKPOINT_SUCCESS,
    CHECKPOINTS,
    EVAL_LOSS,
    RECALL,
    ISD,
    RELATION,
    ISDA,
)

RECALL_DIRECTIONS = ("t2i", "i2t")
RECALL_KS = ("1", "5", "10")
ISD_DIRECTIONS = ("L", "V")


@dataclasses.dataclass(frozen=True)
class Route:
    """A logged key of one record kind that feeds one series.

    `key` is either a whole key (`lr`) or a prefix ending in "/" (`recall/`) whose remainder holds
    the values of the labels named in `parts`, separated by "@" (`recall/t2i@1`).
    """

    kind: str
    key: str
    series: Series
    how: str = SET
    parts: tuple[str, ...] = ()
    allowed: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Label values exported; a key with another value is not a series (it still reaches jsonl)."""
    fixed: Mapping[str, str] = dataclasses.field(default_factory=dict)


ROUTES = (
    # The record's own step and time (every train record has them).
    Route(TRAIN, "step", STEPS, TOTAL),
    Route(TRAIN, "step", LAST_STEP_TIME, TIME),
    Route(TRAIN, "samples", SAMPLES, TOTAL),
    Route(TRAIN, "nonfinite_steps", NONFINITE, TOTAL),
    Route(TRAIN, "loss/", LOSS, parts=("objective",)),
    Route(TRAIN, "samples_per_second", SAMPLES_PER_SECOND),
    Route(TRAIN, "step_seconds", STEP_SECONDS),
    Route(TRAIN, "data_wait_seconds", DATA_WAIT),
    Route(TRAIN, "lr", LEARNING_RATE),
    Route(TRAIN, "grad_norm", GRAD_NORM),
    Route(TRAIN, "loss_scale", LOSS_SCALE),
    Route(TRAIN, "iais_weight", IAIS_WEIGHT),
    Route(TRAIN, "mining_seconds", MINING_SECONDS),
    Route(TRAIN, "candidates_per_second", MINING_RATE),
    Route(TRAIN, "isd/", ISD, parts=("direction",), allowed={"direction": ISD_DIRECTIONS}, fixed={"phase": "train"}),
    Route(EVAL, "loss/", EVAL_LOSS, parts=("objective",)),
    Route(EVAL, "recall/", RECALL, parts=("direction", "k"), allowed={"direction": RECALL_DIRECTIONS, "k": RECALL_KS}),
    Route(EVAL, "isd/", ISD, parts=("direction",), allowed={"direction": ISD_DIRECTIONS}, fixed={"phase": "eval"}),
    Route(EVAL, "relation/", RELATION, parts=("kind",)),
    Route(EVAL, "isda", ISDA),
    Route(CHECKPOINT, "checkpoint_seconds", CHECKPOINT_SECONDS),
    Route(CHECKPOINT, "checkpoint_ok", CHECKPOINTS, OUTCOME),
    Route(CHECKPOINT, "checkpoint_ok", CHECKPOINT_SUCCESS, TIME_IF_TRUE),
    Route(BAD_SAMPLES, "bad_samples/", BAD, TOTAL, parts=("reason",), allowed={"reason": BAD_SAMPLE_REASONS}),
)


@functools.lru_cache(maxsize=4096)
def route(kind: str, key: str) -> tuple[tuple[Route, Mapping[str, str]], ...]:
    """The (route, labels beyond rank and run) pairs a logged `key` of a `kind` record feeds; () for none."""
    found = []
    for r in ROUTES:
        if r.kind != kind:
            continue
        if r.key.endswith("/"):
            if not key.startswith(r.key):
                continue
            values = key[len(r.key) :].split("@")
            if len(values) != len(r.parts) or not all(values):
                continue
            labels = dict(zip(r.parts, values))
            if any(labels[name] not in allowed for name, allowed in r.allowed.items()):
                continue
        elif key != r.key:
            continue
        else:
            labels = {}
        found.append((r, {**labels, **r.fixed}))
    return tuple(found)
