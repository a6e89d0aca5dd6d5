"""ITM alone learns on the synthetic scenes: the `tiny` preset's image-text matching head,
trained with the real pretraining objective (ITC, MLM and IAIS off, uniform random negatives) in a plain
loop over real Loader batches, scores the true caption of a held-out scene above a random other
scene's caption in at least 90% of the comparisons (each held-out image against three other scenes'
captions) after a fixed schedule (1,600 steps, cosine decay).

Why it matters: full and rerank retrieval, the hinge recipe and relation sensitivity all read ITM
scores. With BERT's initialiser range (0.02) and dropout 0.1 in a 64-wide model, the pooled [CLS] of
this preset stayed nearly independent of the image and the loss sat at the 1-in-3 prior (0.636).
"""

from __future__ import annotations

import math
import random
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from data_tools.collate import TextEncoder
from data_tools.curriculum import position_pairs
from data_tools.loader import DataConfig, Loader
from pretrain.config_schema import build as build_config
from pretrain.model import ModelConfig
from pretrain.model.model import RelAlignModel
from pretrain.objectives import Progress, build_sections, pretraining_objective
from pretrain.objectives.position import position_itm_logits, two_way_loss
from tests.pretrain.runs import PYTHON, REPO, env_for

IMAGE_SIZE = 32  # 4 x 4 patches of 8 px: a quarter of the preset's tokens, same shapes
TEXT_LEN = 16  # the longest synthetic caption is 12 words + [CLS] [SEP]
BATCH = 32
LR, WARMUP, STEPS, CHECK_EVERY = 2e-3, 20, 1600, 400
THRESHOLD = 0.9
OTHER_CAPTIONS = (1, 2, 3)  # each held-out image against the captions of the next three scenes of its batch
# Why a fixed cosine schedule and 768 comparisons: with a constant learning rate and 128 comparisons the
# accuracy wandered +-0.03 between checks, and CI's float order (another CPU) ended at 0.898 where this
# machine passed 0.9 at step 800. Measured here with this schedule (torch seeds 0 and 1): 0.918 / 0.932
# at step 800, 0.960 / 0.951 at 1600. (With model.visual_position_std=1.0 it ended at 0.887, and at 0.954
# after 2,400 steps: why the presets keep the small position table.)


def build(out: Path, samples: int, seed: int, split: str) -> Path:
    subprocess.run(
        [
            PYTHON,
            "-m",
            "data_tools",
            "build",
            "synthetic",
            "--samples",
            str(samples),
            "--seed",
            str(seed),
            "--split",
            split,
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env_for(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scenes")
    return build(root / "train", 1024, seed=0, split="train"), build(root / "test", 256, seed=1, split="test")


@torch.no_grad()
def ranking_accuracy(model: RelAlignModel, batches: list[dict]) -> float:
    """Share of (held-out image, other scene's caption) comparisons where the image's true caption has
    the larger ITM logit margin; the other scenes are the next ones of the batch (scenes are random)."""
    model.eval()
    wins = total = 0
    for batch in batches:
        tokens, mask = model.embed_visual(batch)  # [B, M, W], [B, M]
        b, n = tokens.shape[0], 1 + len(OTHER_CAPTIONS)
        rows = torch.cat([torch.arange(b)] + [torch.roll(torch.arange(b), k) for k in OTHER_CAPTIONS])  # [nB]
        ids, text_mask = batch["input_ids"][rows], batch["text_mask"][rows]  # [nB, Lt]
        logits = model.itm_logits(model(ids, text_mask, tokens.repeat(n, 1, 1), mask.repeat(n, 1)))  # [nB, 2]
        score = (logits[:, 1] - logits[:, 0]).view(n, b)  # row 0: true captions
        wins += int((score[:1] > score[1:]).sum())
        total += (n - 1) * b
    model.train()
    return wins / total


def cosine_adamw(model: RelAlignModel, lr: float, warmup: int, steps: int) -> Callable[[torch.Tensor], None]:
    """One optimizer step per call: AdamW, linear warm-up then cosine decay to 0 at `steps`, clip 1.0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))
    )

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()

    return step


def training_batches(loader: Loader, steps: int) -> Iterator[tuple[int, dict]]:
    """(step, batch) for `steps` steps, epoch after epoch."""
    step = 0
    while True:
        for batch in loader:
            yield step, batch
            step += 1
            if step >= steps:
                return
        loader.set_epoch(loader.epoch + 1)


def train_itm(
    train_dir: Path,
    test_dir: Path,
    itm: dict,
    steps: int,
    warmup: int,
    every: int,
    measure: Callable[[RelAlignModel, list[dict]], Any],
) -> tuple[Any, list[tuple[int, Any, float]]]:
    """ITM alone (ITC, MLM off; random in-batch negatives) on the `tiny` preset in a plain loop over real
    Loader batches: AdamW, linear warm-up then cosine decay to 0 at `steps`, clip 1.0, torch seed 0.
    Returns `measure` on the held-out batches before training and [(step, measure, loss)] every `every` steps."""
    torch.manual_seed(0)
    data = dict(batch_size=BATCH, image_size=IMAGE_SIZE, max_text_len=TEXT_LEN, tokenizer=str(train_dir / "tokenizer"))
    loader = Loader(DataConfig(paths=[str(train_dir)], **data))
    held_out = list(Loader(DataConfig(paths=[str(test_dir)], train=False, **data)))
    model = RelAlignModel(ModelConfig.preset("tiny", vocab_size=len(loader.tokenizer), image_size=IMAGE_SIZE))
    objective = pretraining_objective(
        build_sections({"itc": False, "mlm": False, "itm": {"hard_negatives": False, **itm}}, build_config)
    )
    optimise = cosine_adamw(model, LR, warmup, steps)
    before, history = measure(model, held_out), []
    for step, batch in training_batches(loader, steps):
        loss = objective(model, batch, Progress(step, steps)).total
        optimise(loss)
        if (step + 1) % every == 0:
            history.append((step + 1, measure(model, held_out), loss.item()))
    return before, history


@pytest.mark.slow
@pytest.mark.timeout(3000)  # 1,600 steps: about 80 s on CI's 2 cores; 12 min here on 2 cores shared by 4 agents
def test_itm_alone_ranks_true_captions_above_random_ones_on_held_out_scenes(scenes):
    start = time.perf_counter()
    before, history = train_itm(
        *scenes, itm={}, steps=STEPS, warmup=WARMUP, every=CHECK_EVERY, measure=ranking_accuracy
    )
    print(f"ITM ranking accuracy {before:.3f} -> {history}, {time.perf_counter() - start:.1f} s")
    assert 0.35 < before < 0.65  # untrained: chance
    assert history[-1][0] == STEPS and history[-1][1] >= THRESHOLD, f"held-out ranking accuracy by step: {history}"
    assert math.isfinite(history[-1][2])


SWAP_STEPS, SWAP_THRESHOLD, SWAP_TRAIN_SCENES = 3000, 0.58, 2048


@pytest.fixture(scope="module")
def swap_scenes(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("swap_scenes")
    return build(root / "train", SWAP_TRAIN_SCENES, seed=0, split="train"), build(
        root / "test", 1024, seed=1, split="test"
    )


@torch.no_grad()
def swap_accuracy(model: RelAlignModel, batches: list[dict]) -> dict[str, float]:
    """Per negative kind, the share of held-out images whose true caption has a larger ITM logit margin
    than its hard negative (the same caption with the relation or the two colours swapped)."""
    model.eval()
    wins: dict[str, list[bool]] = {}
    for batch in batches:
        tokens, mask = model.embed_visual(batch)  # [B, M, W], [B, M]
        ids = torch.cat([batch["input_ids"], batch["neg_input_ids"]])  # [2B, Lt]
        text_mask = torch.cat([batch["text_mask"], batch["neg_text_mask"]])
        logits = model.itm_logits(model(ids, text_mask, tokens.repeat(2, 1, 1), mask.repeat(2, 1)))  # [2B, 2]
        true, negative = (logits[:, 1] - logits[:, 0]).chunk(2)  # [B] each
        for i, kind in enumerate(batch["negative_kind"]):
            if batch["sample_mask"][i] and batch["has_negative"][i]:
                wins.setdefault(kind, []).append(bool(true[i] > negative[i]))
    model.train()
    return {kind: sum(won) / len(won) for kind, won in wins.items()}


@pytest.mark.slow
@pytest.mark.timeout(3000)  # 3,000 steps: about 3-4 min on CI's 2 cores; 10-30 min here under load
def test_itm_with_caption_negatives_tells_attribute_swaps_apart_on_held_out_scenes(swap_scenes):
    """`objectives.itm.caption_negatives`: each image is also scored against its own caption with the two
    phrases' colours or the relation swapped. Measured (torch seeds 0 and 1, 256 and 1,024 held-out
    scenes): attribute swaps 0.646 / 0.640 at step 3,000 (0.5 at step 1,250: it takes long), relation
    swaps 0.46 / 0.54, i.e. chance: the `tiny` preset does not learn the spatial relation in this budget."""
    before, history = train_itm(
        *swap_scenes,
        itm={"caption_negatives": True},
        steps=SWAP_STEPS,
        warmup=50,
        every=SWAP_STEPS,
        measure=swap_accuracy,
    )
    ((_, after, loss),) = history
    print(f"ITM true caption above its swapped negative, by kind: {before} -> {after}")
    assert set(after) == {"attribute", "relation"}
    assert 0.4 < before["attribute"] < 0.6  # untrained: chance
    assert after["attribute"] >= SWAP_THRESHOLD, after
    assert math.isfinite(loss)


POSITION_STEPS, POSITION_THRESHOLD = 600, 0.85


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 2 x 600 steps: about 40 s on 2 cores
@pytest.mark.parametrize("position_std, learns", [(1.0, True), (None, False)])
def test_itm_learns_where_a_single_shape_is_once_positions_are_visible(scenes, position_std, learns):
    """The first step of the relation curriculum (data_tools/curriculum.py): each image reduced to one of
    its shapes, ITM against "the red circle is left" vs "... is right" (or above / below). With
    `model.visual_position_std=1.0` the held-out accuracy passes 0.85 within 600 steps (measured: 0.917
    on 253 held-out pairs here; 0.96 at step 500 on 16,384 scenes); with the preset's table (std
    initializer_range = 0.1) the patch positions drown in the patch content and the loss stays at ln 2
    (measured: 0.498 here, also 0.498 at std 0.5; 0.48-0.52 up to step 3,000 on 16,384 scenes): why
    relation swaps sit at chance, and what objectives.position requires."""
    train_dir, test_dir = scenes
    torch.manual_seed(0)
    data = dict(batch_size=BATCH, image_size=IMAGE_SIZE, max_text_len=TEXT_LEN, tokenizer=str(train_dir / "tokenizer"))
    loader = Loader(DataConfig(paths=[str(train_dir)], **data))
    held_out = list(Loader(DataConfig(paths=[str(test_dir)], train=False, **data)))
    categories = sorted(loader.categories, key=loader.categories.get)
    encode = TextEncoder(loader.tokenizer, TEXT_LEN)
    overrides = {} if position_std is None else {"visual_position_std": position_std}
    model = RelAlignModel(
        ModelConfig.preset("tiny", vocab_size=len(loader.tokenizer), image_size=IMAGE_SIZE, **overrides)
    )
    optimise, rng = cosine_adamw(model, 1e-3, 50, POSITION_STEPS), random.Random(0)
    for _, batch in training_batches(loader, POSITION_STEPS):
        optimise(
            two_way_loss(
                position_itm_logits(
                    model, encode, batch, pairs := position_pairs(batch, categories, IMAGE_SIZE, rng), pairs
                )
            )
        )

    model.eval()
    wins = []
    with torch.no_grad():
        for batch in held_out:
            pairs = position_pairs(batch, categories, IMAGE_SIZE, random.Random(1))
            true, false = position_itm_logits(model, encode, batch, pairs, pairs).diff(dim=1).squeeze(1).chunk(2)
            wins += (true > false).tolist()
    accuracy = sum(wins) / len(wins)
    print(
        f"single-shape position accuracy, visual_position_std={model.config.visual_position_std}: {accuracy:.3f} "
        f"on {len(wins)} held-out pairs"
    )
    assert len(wins) > 200
    if learns:
        assert accuracy >= POSITION_THRESHOLD
    else:
        assert accuracy < 0.7
