"""The pretraining objectives: ITC against a plain reference (image_id-aware, padding-proof, gathered
across ranks with the right gradient), ITM hard-negative sampling rules, and the combined objective on
the real tiny model."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from data_tools.batch import IGNORE_INDEX
from pretrain.config_schema import build
from pretrain.iais import IAISConfig, IAISRegularizer
from pretrain.model import ModelConfig, RelAlignModel
from pretrain.objectives import (
    Progress,
    build_sections,
    image_id_codes,
    itc_loss,
    pretraining_objective,
    sample_hard_negatives,
)


def _sections(**tree):
    """The `objectives` config section as the schema builds it, e.g. _sections(itc=False, itm={"weight": 2})."""
    return build_sections(tree, build)


def _embeddings(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    image = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return text, image


def _reference_itc(text, image, scale, ids, valid) -> torch.Tensor:
    """One query at a time: keys are the valid samples whose image differs, plus the own pair."""
    losses = []
    for i in range(len(ids)):
        if not valid[i]:
            continue
        keys = [j for j in range(len(ids)) if valid[j] and (j == i or ids[j] != ids[i])]
        target = keys.index(i)
        t2i = scale * text[i] @ image[keys].T
        i2t = scale * image[i] @ text[keys].T
        losses.append(
            (F.cross_entropy(t2i[None], torch.tensor([target])) + F.cross_entropy(i2t[None], torch.tensor([target])))
            / 2
        )
    return torch.stack(losses).mean()


def test_itc_matches_reference_and_masks_same_image_captions() -> None:
    text, image = _embeddings(6)
    ids = ["a", "a", "b", "c", "c", "d"]  # captions 0/1 and 3/4 describe the same image
    valid = torch.ones(6, dtype=torch.bool)
    loss, sim = itc_loss(text, image, torch.tensor(10.0, dtype=torch.float64), image_id_codes(ids), valid)
    expected = _reference_itc(text, image, 10.0, ids, valid.tolist())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    plain = (
        F.cross_entropy(10 * text @ image.T, torch.arange(6)) + F.cross_entropy(10 * image @ text.T, torch.arange(6))
    ) / 2
    assert abs(loss.item() - plain.item()) > 1e-3  # the masking changes the value
    assert torch.allclose(sim, 10 * (text @ image.T))  # temperature-scaled, for hard-negative sampling


def test_itc_padding_slots_weigh_nothing() -> None:
    text, image = _embeddings(5)
    ids = ["a", "b", "c", "d", ""]
    text, image = text.clone().requires_grad_(), image.clone().requires_grad_()
    valid = torch.tensor([True, True, True, True, False])
    loss, _ = itc_loss(text, image, torch.tensor(5.0, dtype=torch.float64), image_id_codes(ids), valid)
    loss.backward()
    t4, i4 = text[:4].detach().clone().requires_grad_(), image[:4].detach().clone().requires_grad_()
    ref, _ = itc_loss(t4, i4, torch.tensor(5.0, dtype=torch.float64), image_id_codes(ids[:4]), valid[:4])
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(text.grad[:4], t4.grad) and torch.allclose(image.grad[:4], i4.grad)
    assert text.grad[4].abs().max() == 0 and image.grad[4].abs().max() == 0


def test_hard_negatives_respect_image_ids_padding_and_similarity() -> None:
    torch.manual_seed(0)
    ids = ["a", "a", "b", "c", ""]
    valid = torch.tensor([True, True, True, True, False])
    sim = torch.zeros(5, 5)
    sim[0, 3] = sim[2, 3] = 50.0  # texts 0 and 2 are most similar to image 3
    sim[3, 2] = 50.0
    codes = image_id_codes(ids)
    for _ in range(20):
        neg_text, neg_image, has = sample_hard_negatives(sim, codes, valid)
        for i in range(4):
            assert ids[neg_image[i]] not in (ids[i], "") and ids[neg_text[i]] not in (ids[i], "")
        assert neg_image[0] == 3 and neg_image[2] == 3 and neg_image[3] == 2  # peaked similarity wins
        assert has.tolist() == [True, True, True, True, False]
    _, _, has = sample_hard_negatives(None, image_id_codes(["a", "a"]), torch.ones(2, dtype=torch.bool))
    assert has.tolist() == [False, False]  # nothing to contrast with: weight zero, never a crash


def _gather_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    text, image = _embeddings(8)
    ids = ["a", "b", "c", "c", "d", "e", "a", "f"]  # "a" and "c" span both ranks
    local = slice(rank * 4, rank * 4 + 4)
    t = text[local].clone().requires_grad_()
    i = image[local].clone().requires_grad_()
    loss, _ = itc_loss(
        t, i, torch.tensor(7.0, dtype=torch.float64), image_id_codes(ids[local]), torch.ones(4, dtype=torch.bool)
    )
    loss.backward()
    out[rank] = (loss.item(), t.grad.clone(), i.grad.clone())
    dist.destroy_process_group()


def test_itc_gathered_across_ranks_has_the_full_batch_gradient(port: int) -> None:
    """OpenCLIP's local loss: rank r's gradient on its features = world x the full-batch gradient
    (DeepSpeed then averages parameter gradients over ranks)."""
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_gather_worker, args=(port, out), nprocs=2, join=True)
    text, image = _embeddings(8)
    ids = ["a", "b", "c", "c", "d", "e", "a", "f"]
    text.requires_grad_(), image.requires_grad_()
    full, _ = itc_loss(
        text, image, torch.tensor(7.0, dtype=torch.float64), image_id_codes(ids), torch.ones(8, dtype=torch.bool)
    )
    full.backward()
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(full.item(), rel=1e-12)
    for rank in (0, 1):
        local = slice(rank * 4, rank * 4 + 4)
        assert torch.allclose(out[rank][1], 2 * text.grad[local], atol=1e-12)
        assert torch.allclose(out[rank][2], 2 * image.grad[local], atol=1e-12)


def _batch(b: int = 6, lt: int = 12, vocab: int = 40, padding: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, lt + 1, (b,), generator=g)
    text_mask = torch.arange(lt)[None] < lengths[:, None]
    input_ids = torch.randint(5, vocab, (b, lt), generator=g) * text_mask
    input_ids[:, 0] = 2
    input_ids[torch.arange(b), lengths - 1] = 3
    mlm_labels = torch.full((b, lt), IGNORE_INDEX)
    mlm_labels[:, 1] = input_ids[:, 1]
    mlm_input = input_ids.clone()
    mlm_input[:, 1] = 4
    sample_mask = torch.arange(b) < b - padding
    return {
        "input_ids": input_ids,
        "text_mask": text_mask,
        "mlm_input_ids": mlm_input,
        "mlm_labels": mlm_labels,
        "sample_mask": sample_mask,
        "pixel_values": torch.randn(b, 3, 32, 32, generator=g),
        "image_id": [f"img{i // 2}" if sample_mask[i] else "" for i in range(b)],
        "key": [str(i) for i in range(b)],
    }


@pytest.fixture
def tiny_model() -> RelAlignModel:
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", vocab_size=40, image_size=32, patch_size=8, dropout=0.0, attention_dropout=0.0)
    return RelAlignModel(config).eval()


def test_pretrain_objective_sums_weighted_parts(tiny_model: RelAlignModel) -> None:
    regularizer = IAISRegularizer(IAISConfig(schedule="constant", weight=0.5), tiny_model.config.num_layers)
    regularizer.attach(tiny_model)
    objective = pretraining_objective(
        _sections(itc={"weight": 1.0}, itm={"weight": 2.0}, mlm={"weight": 0.5}), regularizer
    )
    torch.manual_seed(0)
    out = objective(tiny_model, _batch(), Progress(step=3, total_steps=10))
    logs = {k: v.item() for k, v in out.logs.items()}
    assert {"loss/itc", "loss/itm", "loss/mlm", "loss/iais", "loss/total", "iais_weight", "isd/L", "isd/V"} <= set(logs)
    expected = logs["loss/itc"] + 2.0 * logs["loss/itm"] + 0.5 * logs["loss/mlm"] + 0.5 * logs["loss/iais"]
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert logs["iais_weight"] == 0.5 and logs["loss/iais"] > 0
    out.total.backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    itm_head = [n for n in grads if n.startswith("itm.")]
    assert itm_head and all(grads[n].abs().sum() > 0 for n in itm_head)  # every ITM head tensor learns


def test_switched_off_objectives_are_absent(tiny_model: RelAlignModel) -> None:
    objective = pretraining_objective(_sections(itc=False, itm=False, mlm=True))
    out = objective(tiny_model, _batch(), Progress(0, 10))
    assert set(out.logs) == {"loss/mlm", "loss/total"}
    assert out.total.item() == pytest.approx(out.logs["loss/mlm"].item())


def test_padding_slot_does_not_change_mlm_and_itc(tiny_model: RelAlignModel) -> None:
    """A padding slot with arbitrary content leaves the deterministic objectives unchanged."""
    objective = pretraining_objective(_sections(itc=True, itm=False, mlm=True))
    batch = _batch(b=6, padding=1)
    base = objective(tiny_model, batch, Progress(0, 10))
    trimmed = {k: (v[:5] if torch.is_tensor(v) else v[:5]) for k, v in batch.items()}
    ref = objective(tiny_model, trimmed, Progress(0, 10))
    for key in ("loss/itc", "loss/mlm"):
        assert base.logs[key].item() == pytest.approx(ref.logs[key].item(), rel=1e-5), key


def test_caption_negatives_add_the_samples_own_swapped_caption_as_not_matched(tiny_model: RelAlignModel) -> None:
    """objectives.itm.caption_negatives: one more joint row per sample that has a negative caption, labelled
    0; the ITM loss equals a direct cross-entropy over exactly those rows."""
    batch = _batch(b=4, padding=0)
    g = torch.Generator().manual_seed(3)
    batch["neg_input_ids"] = torch.randint(5, 40, batch["input_ids"].shape, generator=g) * batch["text_mask"]
    batch["neg_text_mask"] = batch["text_mask"].clone()
    batch["has_negative"] = torch.tensor([True, False, True, True])
    base = _sections(itc=False, mlm=False, itm={"hard_negatives": False})
    with_neg = _sections(itc=False, mlm=False, itm={"hard_negatives": False, "caption_negatives": True})
    seen = []
    forward = tiny_model.forward
    tiny_model.forward = lambda ids, *a, **k: seen.append(ids.shape[0]) or forward(ids, *a, **k)
    try:
        torch.manual_seed(5)
        plain = pretraining_objective(base)(tiny_model, batch, Progress(0, 10))
        torch.manual_seed(5)
        extra = pretraining_objective(with_neg)(tiny_model, batch, Progress(0, 10))
    finally:
        del tiny_model.forward
    assert seen == [12, 16]  # [3B] rows, then [4B] rows
    # the extra rows: image b with its own negative caption, label 0, weight has_negative[b]
    tokens, mask = tiny_model.embed_visual(batch)
    out = tiny_model(batch["neg_input_ids"], batch["neg_text_mask"], tokens, mask)
    extra_ce = F.cross_entropy(tiny_model.itm_logits(out), torch.zeros(4, dtype=torch.long), reduction="none")
    # plain loss = mean over 12 weighted rows (all valid); with negatives: (12 * plain + sum of 3 extra) / 15
    expected = (12 * plain.logs["loss/itm"] + extra_ce[batch["has_negative"]].sum()) / 15
    assert extra.logs["loss/itm"].item() == pytest.approx(expected.item(), rel=1e-5)
