"""Oscar tags, MRM and WRA on the real tiny model and real loader batches of the synthetic scenes:
each is off by default and, switched on, changes the total only by its own term (tags also extend
MLM's text, by design); its gradients reach the parameters it trains; the tags work on batches
without boxes; MRM masks visual tokens only (conditional masking)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_tools.transforms import normalise_batch
from pretrain.config import load_config
from pretrain.objectives import Progress
from pretrain.objectives.tags import append_tags
from pretrain.task import PretrainTask
from tests.pretrain.runs import TINY, build_synthetic

BASE = [
    "data.batch_size=6",
    "data.max_tag_len=12",
    "model.max_text_len=64",
    "model.dropout=0.0",
    "model.attention_dropout=0.0",
    "iais.schedule=constant",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("data") / "synthetic", samples=12)


def _setup(synthetic: Path, *overrides: str):
    """(model, objective, first loader batch) built the way the trainer builds them."""
    cfg = load_config(TINY, [f"data.paths=[{synthetic}]", *BASE, *overrides])
    task = PretrainTask(cfg)
    loader = task.train_loader(cfg.data.batch_size, 0, 1)
    torch.manual_seed(0)
    model = task.build_model(loader.tokenizer, fresh=True, say=lambda _: None)
    batch = normalise_batch(next(iter(loader)))
    return model, task.objective(), batch


def _run(model, objective, batch, seed: int = 1):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = objective(model, batch, Progress(3, 10))
    out.total.backward()
    return {k: float(v) for k, v in out.logs.items()}


def test_each_objective_changes_the_loss_only_when_enabled(synthetic: Path) -> None:
    model, objective, batch = _setup(synthetic)
    base = _run(model, objective, batch)
    assert not {"loss/tags", "loss/mrm", "loss/wra"} & set(base)  # off by default
    shared = ("loss/itc", "loss/itm", "loss/iais")
    for name, overrides, weight in (
        ("wra", ["objectives.wra.enabled=true", "objectives.wra.weight=0.7"], 0.7),
        ("mrm", ["objectives.mrm.enabled=true", "objectives.mrm.mrc=true"], 1.0),
        ("tags", ["objectives.tags.enabled=true", "objectives.tags.weight=2"], 2.0),
    ):
        on = _run(*_setup(synthetic, *overrides)[:2], batch)
        assert on[f"loss/{name}"] > 0
        assert all(on[k] == pytest.approx(base[k], rel=1e-6) for k in shared), name
        extra = weight * on[f"loss/{name}"]
        if name == "tags":  # the MLM text gains the tags: MLM's loss changes with them
            assert on["loss/mlm"] != pytest.approx(base["loss/mlm"], rel=1e-4)
            extra += on["loss/mlm"] - base["loss/mlm"]
        else:
            assert on["loss/mlm"] == pytest.approx(base["loss/mlm"], rel=1e-6)
        assert on["loss/total"] == pytest.approx(base["loss/total"] + extra, rel=1e-5)


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


ONLY = ["objectives.itc=false", "objectives.itm=false", "objectives.mlm=false", "iais.enabled=false"]


def test_mrm_masks_visual_tokens_only_and_trains_the_visual_embedder(synthetic: Path) -> None:
    model, objective, batch = _setup(synthetic, *ONLY, "objectives.mrm.enabled=true", "objectives.mrm.mrc=true")
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), args[2].detach().clone())))
    logs = _run(model, objective, batch)
    assert logs["loss/mrm"] == pytest.approx(logs["loss/mrfr"] + logs["loss/mrc"], rel=1e-6)
    ((ids, visual),) = seen  # one joint pass
    assert torch.equal(ids, batch["input_ids"])  # words never masked on the MRM pass
    zeroed = (visual == 0).all(dim=-1)  # [B, M]
    real = batch["sample_mask"]
    assert zeroed[real].any(dim=1).all() and not zeroed[real].all(dim=1).any()  # some, never all, per sample
    assert not zeroed[~real].any()
    assert _grad_norm(model.visual) > 0 and _grad_norm(objective.heads["mrm"]["mrfr"]) > 0
    assert _grad_norm(objective.heads["mrm"]["mrc"]) > 0  # the synthetic boxes carry categories
    assert _grad_norm(model.itm) == 0 and _grad_norm(model.itc) == 0


def test_mrm_targets_are_each_tokens_input_pixels(synthetic: Path) -> None:
    from pretrain.objectives.mrm import token_inputs

    model, _, batch = _setup(synthetic)
    targets = token_inputs(model, batch)  # [B, M, 3 p p]
    p = model.config.patch_size
    patch = batch["pixel_values"][1, :, p : 2 * p, 2 * p : 3 * p]  # row 1, column 2 of the patch grid
    cols = batch["pixel_values"].shape[-1] // p
    assert torch.equal(targets[1, 1 * cols + 2], patch.reshape(-1))
    # Linear in the pixels as the patch convolution is: the conv's output is weight @ target + bias.
    conv = model.visual.proj
    out = conv(batch["pixel_values"][:1]).flatten(2).transpose(1, 2)[0, 1 * cols + 2]
    assert torch.allclose(out, conv.weight.flatten(1) @ targets[0, 1 * cols + 2] + conv.bias, atol=1e-5)


def test_tags_extend_the_mlm_text_and_train_the_tag_embeddings(synthetic: Path) -> None:
    model, objective, batch = _setup(
        synthetic,
        "objectives.itc=false",
        "objectives.itm=false",
        "iais.enabled=false",
        "objectives.tags.enabled=true",
        "objectives.tags.pollute_probability=0",
    )
    embedded = []

    def keep(module, args, out):
        out.retain_grad()
        embedded.append((args[0], out))

    model.embeddings.word_embeddings.register_forward_hook(keep)
    logs = _run(model, objective, batch)
    ((ids, out),) = embedded  # one pass: MLM's, whose [CLS] the tags head reads too
    lt = batch["input_ids"].shape[1]
    assert ids.shape[1] == lt + batch["tag_ids"].shape[1] - 1
    for i in range(2):  # [CLS] words [SEP] tags [SEP], nothing masked here but MLM's own masking
        words = int(batch["text_mask"][i].sum())
        tags = int(batch["tag_mask"][i].sum()) - 1
        assert torch.equal(ids[i, :words], batch["mlm_input_ids"][i, :words])
        assert torch.equal(ids[i, words : words + tags], batch["tag_mlm_ids"][i, 1 : tags + 1])
        assert tags > 1 and out.grad[i, words : words + tags - 1].abs().sum(dim=-1).gt(0).all()
    assert logs["loss/tags"] > 0 and _grad_norm(objective.heads["tags"]) > 0


def test_pollution_labels_and_batches_without_boxes(synthetic: Path) -> None:
    model, objective, batch = _setup(
        synthetic,
        "objectives.tags.enabled=true",
        "objectives.tags.pollute_probability=1",
        "objectives.mrm.enabled=true",
        "objectives.mrm.mrc=true",
    )
    from pretrain.objectives.tags import pollute

    torch.manual_seed(0)
    source, polluted = pollute(batch["tag_ids"], batch["sample_mask"], 1.0)
    real = batch["sample_mask"]
    assert (source[real] != torch.arange(len(source))[real]).all()  # every real row took another's tags
    assert torch.equal(polluted, (batch["tag_ids"][source] != batch["tag_ids"]).any(dim=1))
    # No boxes anywhere: tags are `[CLS] [SEP]`, nothing is polluted, MRC has no labels; all finite.
    empty = dict(batch)
    b, lg = batch["tag_ids"].shape
    empty["tag_ids"] = batch["tag_ids"][:, :1].expand(b, lg).clone() * 0
    empty["tag_ids"][:, :2] = batch["tag_ids"][:, :2].clone()
    empty["tag_ids"][:, 1] = batch["input_ids"].gather(1, batch["text_mask"].sum(1, keepdim=True) - 1)[:, 0]  # [SEP]
    empty["tag_mask"] = torch.zeros_like(batch["tag_mask"])
    empty["tag_mask"][:, :2] = True
    empty["tag_mlm_ids"], empty["tag_mlm_labels"] = empty["tag_ids"].clone(), torch.full_like(empty["tag_ids"], -100)
    empty["boxes"] = [torch.zeros(0, 4) for _ in range(b)]
    empty["box_categories"] = [torch.zeros(0, dtype=torch.long) for _ in range(b)]
    logs = _run(model, objective, empty)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert logs["loss/mrc"] == 0 and logs["loss/tags"] > 0


def test_append_tags_packs_words_then_tags() -> None:
    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 7, 102, 0, 0]])
    tags = torch.tensor([[101, 8, 9, 102], [101, 102, 0, 0]])
    mask, tag_mask = ids != 0, tags != 0
    out, out_mask, labels = append_tags(ids, mask, ids * 0 - 100, tags, tag_mask, tags)
    assert out.tolist() == [[101, 5, 6, 102, 8, 9, 102, 0], [101, 7, 102, 102, 0, 0, 0, 0]]
    assert out_mask.sum(1).tolist() == [7, 4]
    assert labels[0].tolist() == [-100, -100, -100, -100, 8, 9, 102, -100]  # the words' padding moved last


def test_wra_leaves_padding_slots_out_of_its_mean_and_gradients_finite(synthetic: Path) -> None:
    """A padding slot (sample_mask False) is computed in the same batched pass but selected away: what
    it holds does not move the loss, and its stand-in alignment keeps every gradient finite."""
    model, objective, batch = _setup(synthetic, *ONLY, "objectives.wra.enabled=true")
    full = _run(model, objective, batch)["loss/wra"]
    padded = dict(batch, sample_mask=batch["sample_mask"].clone())
    padded["sample_mask"][-1] = False
    first = _run(model, objective, padded)["loss/wra"]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    other = dict(padded, pixel_values=padded["pixel_values"].clone(), input_ids=padded["input_ids"].clone())
    other["pixel_values"][-1] = torch.randn_like(other["pixel_values"][-1])
    other["input_ids"][-1] = other["input_ids"][0]
    assert _run(model, objective, other)["loss/wra"] == pytest.approx(first, rel=1e-6)
    assert first != pytest.approx(full, rel=1e-6)
