"""What an objective is, and how terms register so that a new one is one file.

The loop backpropagates `ObjectiveOutput.total` and logs `ObjectiveOutput.logs`; anything callable as
`objective(model, batch, progress)` can be trained. Pretraining and finetuning objectives are built
from *terms*: small classes registered by name with their own config section,

    @register("itc", order=10)
    class ITC(Term):
        Config = ITCConfig            # a TermConfig dataclass: enabled, weight, own fields
        def loss(self, ctx: StepContext) -> Tensor: ...

which become `objectives.<name>` in the configuration (`objectives.itc.weight=0.5`, or
`objectives.itc=false` as a shorthand for `enabled: false`). `CompositeObjective` runs the enabled
terms in `order`, sums `weight(progress) x loss`, and logs `loss/<name>` for each (the metrics
exporter turns every `loss/<name>` into `relalign_loss{objective="<name>"}`: no list to edit).
Terms share one `StepContext` per micro-batch: the visual tokens are embedded once, ITC leaves its
similarities for ITM's hard negatives, and the first joint pass over the matched pairs leaves their
IAIS attention blocks for the IAIS term. A plugin module named in the config's `plugins` list is
imported before validation, so its terms are configurable like the built-in ones.

Terms with parameters (MRM's regression and classification heads, the tags' polluted/original head)
build them in `build_head(model_config, categories)`; `CompositeObjective.build_heads` collects them in
`objective.heads` (an nn.ModuleDict), which `pretrain.engine.TrainModule` registers beside the model:
DeepSpeed then trains, partitions and checkpoints them like the model's own parameters (names
`heads.<term>.*`), while the model, its exports and finetuning never see them (pretraining-only
heads, as UNITER drops its region heads). The task builds them right after the model, before the
per-rank reseed, so every rank starts from the same head weights.

`objectives.sampling`: `joint` (every enabled term on every batch, weighted sum) or `per_batch`
(UNITER: one term per optimizer step, drawn with probability proportional to its weight by a pure
function of (train.seed, step), so every rank and a resumed run draw the same; the drawn term's loss
is not multiplied by its weight, which already set how often it is drawn). Regularisers that ride
on another term's pass (IAIS, `sampled = False`) run on every step.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch
from torch import Tensor, nn

from data_tools.batch import image_id_codes
from data_tools.errors import ConfigError, check
from pretrain.model.masks import mark_unpadded

if TYPE_CHECKING:
    pass


@dataclasses.dataclass
class Progress:
    """Where training stands, for objectives with schedules (IAIS weight, alternate directions)."""

    step: int
    total_steps: int


@dataclasses.dataclass
class ObjectiveOutput:
    """`total`: the scalar to backpropagate. `logs`: detached scalars named like the metrics keys
    (`loss/itc`, `loss/total`, `iais_weight`, `isd/L`, ...)."""

    total: Tensor
    logs: dict[str, Tensor]


class Objective(Protocol):
    """Any callable of this shape (a task may return a plain function). A CompositeObjective also has
    `observe`, `state_dict` and `load_state_dict` (phases of its terms); `phases_of` gives no-ops otherwise."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any], progress: Progress) -> ObjectiveOutput: ...


class _NoPhases:
    """The phase interface of an objective that keeps no state (a plain callable)."""

    def observe(self, progress: Progress) -> list[str]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def phases_of(objective: Any) -> Any:
    """`objective` itself when it has observe / state_dict / load_state_dict (a CompositeObjective: on
    logging steps it lets terms end their phases, and its state is saved with the run), else no-ops."""
    names = ("observe", "state_dict", "load_state_dict")
    return objective if all(callable(getattr(objective, n, None)) for n in names) else _NoPhases()


@dataclasses.dataclass
class TermConfig:
    """Fields every term has; a term's own Config subclasses this."""

    enabled: bool = True
    """Compute this term."""
    weight: float = 1.0
    """Its weight in the total loss."""

    def __post_init__(self) -> None:
        check("weight", self.weight, self.weight >= 0, "a weight >= 0")


class Term:
    """One loss of a composite objective. Subclasses set `Config` and implement `loss`."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 50
    Config: ClassVar[type[TermConfig]] = TermConfig
    sampled: ClassVar[bool] = True
    """A candidate of `objectives.sampling=per_batch` (False: a regulariser that runs on every step)."""

    def __init__(self, config: TermConfig):
        self.config = config
        self.head: nn.Module | None = None
        """This term's own parameters (built by `build_head`), registered with the engine."""

    def weight(self, progress: Progress) -> float:
        return self.config.weight

    def build_head(self, model_config: Any, categories: list[str]) -> nn.Module | None:
        """The term's own parameters, if any. model_config: pretrain.model.ModelConfig (vocab_size
        set); categories: the datasets' box label vocabulary (data_tools.manifest.category_vocabulary)."""
        return None

    def bind_text(self, tokenizer: Any, categories: list[str]) -> None:
        """Before training: the run's tokenizer and box categories, for a term that writes its own text
        (the position captions)."""

    def holds_others(self, progress: Progress) -> bool:
        """True on steps where this term trains alone (a curriculum phase): the others are not computed."""
        return False

    def observe(self, progress: Progress) -> list[str]:
        """On logging steps, on every rank at once (it may run one collective): decide phase changes from
        what `loss` accumulated since the last call; -> lines to print (rank 0 prints them)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """This term's state beyond its parameters (plain JSON data), saved with the run state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (a resumed run)."""

    def prepare(self, ctx: "StepContext") -> None:
        """Before any term's loss of this micro-batch: leave shared inputs in the context (tags)."""

    def loss(self, ctx: "StepContext") -> Tensor:
        raise NotImplementedError


TERMS: dict[str, type[Term]] = {}
"""Registered terms by name (the keys of the `objectives` config section)."""


def register(name: str, order: int = 50) -> Callable[[type[Term]], type[Term]]:
    """Class decorator: make a Term configurable as `objectives.<name>`; lower `order` runs first."""

    def wrap(cls: type[Term]) -> type[Term]:
        if name in TERMS and TERMS[name] is not cls:
            raise ValueError(f"objective term {name!r} registered twice ({TERMS[name].__module__}, {cls.__module__})")
        cls.name, cls.order = name, order
        TERMS[name] = cls
        return cls

    return wrap


def import_plugins(modules: list[str]) -> None:
    """Import the modules of the config's `plugins` list (they register terms)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError("plugins", module, f"an importable module ({err})") from None


def sample_categorical(logits: Tensor) -> Tensor:
    """One index per row drawn with probability softmax(logits) (-inf: never), Gumbel-max.

    logits [R, C] -> [R] long. Why not `torch.multinomial`: it reads its input back on the host
    (two checks per call) and so stops a GPU step; argmax(logits + Gumbel noise) draws from the same
    distribution on the device. The noise comes from the torch RNG of the logits' device (saved in
    checkpoints). A row must have at least one finite logit."""
    noise = torch.empty_like(logits, dtype=torch.float32).exponential_()  # [R, C], Exp(1)
    gumbel = -noise.clamp_min(torch.finfo(torch.float32).tiny).log()  # finite even for a draw of exactly 0
    return (logits.float() + gumbel).argmax(dim=1)


def wide(x: Tensor) -> Tensor:
    """At least float32 for a loss (bf16/fp16 logits lose too much in log-softmax); float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Mean of `values` over the rows where `weights` is True; other rows (padding slots, whose
    values may be inf: every key masked) are selected away, not multiplied by zero."""
    keep = weights.bool()
    return torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum().clamp(min=1).to(values.dtype)


class StepContext:
    """What the terms of one micro-batch share (computed once, on first use).

    Padding slots (`sample_mask` False, DESIGN.md 3) weigh zero in every term: as queries, keys and
    negatives.
    """

    def __init__(self, model: torch.nn.Module, batch: dict[str, Any], progress: Progress, want_attention: bool):
        self.model, self.batch, self.progress = model, batch, progress
        self.want_attention = want_attention
        """Some term reads IAIS attention blocks: the first joint pass over the matched pairs computes them."""
        self.sample_mask: Tensor = batch["sample_mask"]  # [B] bool
        if batch.get("text_unpadded"):  # the loader saw no padded caption: attention over the text needs no mask
            mark_unpadded(batch["text_mask"])
        self.logs: dict[str, Tensor] = {}
        self.itc_similarity: Tensor | None = None
        """[B text, B image] temperature-scaled similarities left by ITC (hard-negative sampling)."""
        self.matched_attention: dict[int, Any] | None = None
        """IAIS attention blocks of the matched pairs, left by the first joint pass that computed them."""
        self.iais_direction: str | None = None
        """A term may choose the IAIS direction of this micro-batch (finetuning: V on image-built batches)."""
        self.matched_hidden: Tensor | None = None
        """[B, Lt + M, W] encoder output of the matched pairs (unmasked text), left by the first term that
        made that pass (ITM's first B rows, or WRA's own)."""
        self.extend_mlm_text: (
            Callable[["StepContext", tuple[Tensor, Tensor, Tensor]], tuple[Tensor, Tensor, Tensor]] | None
        ) = None
        """Set by a term's `prepare` that extends the MLM text (tags); applied on first use, so its
        random draws come after those of the terms that run earlier (ITM's negatives stay the same)."""
        self._mlm_text: tuple[Tensor, Tensor, Tensor] | None = None
        self.mlm_output: Any = None
        """The EncoderOutput of the MLM pass (the tags head reads its [CLS])."""
        self.tags_polluted: Tensor | None = None
        """[B] bool: whose tags in `mlm_text` are another sample's (left by the tags term's prepare)."""
        self._codes: Tensor | None = None
        self._visual: tuple[Tensor, Tensor] | None = None

    @property
    def codes(self) -> Tensor:
        """[B] image-id codes on the batch's device (the loader's `image_code`; a hand-built batch's
        are computed here and copied)."""
        if self._codes is None:
            codes = self.batch.get("image_code")
            if codes is None:
                codes = image_id_codes(self.batch["image_id"]).to(self.batch["input_ids"].device)
            self._codes = codes
        return self._codes

    @property
    def matched_rows(self) -> Tensor:
        """The matched pairs (real samples) as `iais_rows` for a joint pass whose first B rows are the
        batch: the loader's `sample_rows` [P] long, or `sample_mask` [B] bool (which the model turns
        into indices with a host read)."""
        rows = self.batch.get("sample_rows")
        return self.sample_mask if rows is None else rows

    @property
    def visual(self) -> tuple[Tensor, Tensor]:
        """(visual tokens [B, M, D], visual mask [B, M]) embedded once per micro-batch."""
        if self._visual is None:
            self._visual = self.model.embed_visual(self.batch)
        return self._visual

    def mlm_text(self) -> tuple[Tensor, Tensor, Tensor]:
        """(input ids, text mask, labels) [B, L] of the MLM pass: the batch's `mlm_input_ids`,
        `text_mask`, `mlm_labels`, extended once by `extend_mlm_text` where a term set it."""
        if self._mlm_text is None:
            batch = self.batch
            text = (batch["mlm_input_ids"], batch["text_mask"], batch["mlm_labels"])
            self._mlm_text = self.extend_mlm_text(self, text) if self.extend_mlm_text is not None else text
        return self._mlm_text

    def joint(
        self,
        input_ids: Tensor,
        text_mask: Tensor,
        visual_tokens: Tensor,
        visual_mask: Tensor,
        matched_rows: Tensor | None = None,
    ) -> Any:
        """A joint pass; `matched_rows` (`matched_rows`: [P] long indices, or a bool mask over the first
        rows) are the matched pairs whose IAIS blocks are computed (when a term wants them and none were
        computed yet)."""
        iais_rows = matched_rows if self.want_attention and self.matched_attention is None else None
        out = self.model(input_ids, text_mask, visual_tokens, visual_mask, iais_rows=iais_rows)
        if iais_rows is not None:
            self.matched_attention = out.attention
        return out
