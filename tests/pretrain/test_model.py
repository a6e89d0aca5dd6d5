"""The single-stream model: config, visual embedders, encoder (SDPA + IAIS blocks), heads (and, where
natural, the same checks on the two-stream model: tests/pretrain/test_architectures.py has the rest)."""

from __future__ import annotations

import sys

import efficientnet_lite_pytorch  # noqa: F401  (in the dev extra: the grid embedder tests need it)
import pytest
import torch
import torch.nn.functional as F

from data_tools.errors import ConfigError, UserError
from pretrain.model import EncoderOutput, ModelConfig, RelAlignModel, build_model
from pretrain.model import encoder as encoder_module
from pretrain.model.model import word_mask_from_text_mask

from .iais_reference import reference_blocks


def tiny(**overrides) -> RelAlignModel:
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("tiny", vocab_size=60, **overrides))


def patch_batch(size=3, image=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.arange(10)[None] < torch.tensor([10, 6, 8, 4][:size])[:, None]
    return dict(
        input_ids=torch.randint(5, 60, (size, 10), generator=g) * text_mask,
        text_mask=text_mask,
        pixel_values=torch.randn(size, 3, image, image, generator=g),
    )


def run(model, batch, rows=None) -> EncoderOutput:
    tokens, mask = model.embed_visual(batch)
    return model(batch["input_ids"], batch["text_mask"], tokens, mask, iais_rows=rows)


def test_presets():
    small = ModelConfig.preset("small", vocab_size=30522)
    assert (small.num_layers, small.width, small.num_heads, small.intermediate_size) == (6, 384, 12, 1536)
    assert (ModelConfig.preset("base").num_layers, ModelConfig.preset("base").width) == (12, 768)
    large = ModelConfig.preset("large")
    assert (large.num_layers, large.width, large.num_heads) == (24, 1024, 16)
    assert ModelConfig.preset("tiny", num_layers=3).num_layers == 3


@pytest.mark.parametrize("std, expected", [(None, 0.1), (1.0, 0.88)])
def test_patch_position_table_starts_at_its_own_std(std, expected):
    """`visual_position_std` (null: initializer_range, 0.1 at tiny) sets the patch position table's
    initial spread; the rest of the model keeps `initializer_range` (at 0.1 the positions drown
    in the patch content, which `objectives.position` cannot live with)."""
    torch.manual_seed(0)
    overrides = {} if std is None else {"visual_position_std": std}
    model = RelAlignModel(ModelConfig.preset("tiny", vocab_size=40, **overrides))
    table = model.visual.position  # 64 x 64 values: the sample std is within a few % of the target
    # (trunc_normal_ cuts at +-2: 2 sd at std 1.0, which leaves an sd of 0.88; nothing at 0.1)
    assert table.std().item() == pytest.approx(expected, rel=0.06)
    assert model.visual.proj.weight.std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="huge"), r"model\.preset='huge'.*tiny \| small \| base \| large"),
        (dict(name="tiny", depth=3), r"model\.depth=3 .*ModelConfig field"),
        (dict(name="tiny", num_heads=5), r"model\.num_heads=5 .*divisor of model\.width=64"),
        (dict(name="tiny", visual_embedder="vit"), r"model\.visual_embedder='vit'.*patch \| features \| grid"),
        (dict(name="tiny", patch_size=7), r"model\.patch_size=7"),
        (dict(name="tiny", dropout=1.5), r"model\.dropout=1\.5"),
        (dict(name="tiny", vocab_size=0), r"model\.vocab_size=0"),
        (dict(name="tiny", visual_position_std=0), r"model\.visual_position_std=0 .*positive"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.preset(kwargs.pop("name"), **kwargs)


def test_vocab_size_is_required_to_build():
    with pytest.raises(ConfigError, match="model.vocab_size=None"):
        RelAlignModel(ModelConfig.preset("tiny"))


def test_word_mask_drops_cls_sep_and_padding():
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(word_mask_from_text_mask(text_mask), expected)


@pytest.mark.parametrize("architecture", ["single_stream", "two_stream"])
@pytest.mark.parametrize("training", [False, True])
def test_output_is_identical_with_iais_on_and_off(training, architecture):
    model = tiny(architecture=architecture, cross_layers=2).train(training)
    batch = patch_batch()
    torch.manual_seed(5)
    off = run(model, batch)
    torch.manual_seed(5)
    on = run(model, batch, rows=torch.tensor([True, False, True]))
    assert off.attention == {} and set(on.attention) == {1}  # the last layer (two_stream: co-attention block)
    assert torch.equal(on.hidden, off.hidden)


def test_blocks_match_the_layers_own_qk():
    model = tiny().eval()
    model.set_iais_layers([0, 1])
    batch = patch_batch()
    captured = {}
    model.encoder.layer[1].register_forward_pre_hook(lambda mod, args: captured.update(hidden=args[0]))
    rows = torch.tensor([False, True, True])
    out = run(model, batch, rows)
    layer = model.encoder.layer[1]
    heads, dim = model.config.num_heads, model.config.head_dim
    hidden = captured["hidden"][rows]  # [P, L, W]
    proj = layer.attention.self
    q = proj.query(hidden).view(*hidden.shape[:2], heads, dim).transpose(1, 2)
    k = proj.key(hidden).view(*hidden.shape[:2], heads, dim).transpose(1, 2)
    blocks = out.attention[1]
    words = (batch["text_mask"].sum(1) - 2)[rows].tolist()
    assert blocks.word_mask.sum(1).tolist() == words
    for p, n in enumerate(words):
        want = reference_blocks(q[p].detach(), k[p].detach(), n, 64, text_len=10)
        for got, ref in zip((blocks.s_ll[p, :n, :n], blocks.s_vv[p], blocks.s_lv[p, :n], blocks.s_vl[p, :, :n]), want):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # Every real row of every block is a distribution over the real columns.
    torch.testing.assert_close(blocks.s_ll.sum(-1)[blocks.word_mask], torch.ones(sum(words)))
    assert (blocks.s_ll.masked_select(~blocks.word_mask[:, None, :].expand_as(blocks.s_ll)) == 0).all()


@pytest.mark.parametrize("architecture", ["single_stream", "two_stream"])
def test_only_the_fused_kernel_attends(monkeypatch, architecture):
    model = tiny(architecture=architecture)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(
        encoder_module.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )

    def forbidden(*args, **kwargs):
        raise AssertionError("attention probabilities materialised outside the IAIS layers")

    monkeypatch.setattr(torch.Tensor, "softmax", forbidden)
    monkeypatch.setattr(torch, "softmax", forbidden)
    run(model, patch_batch())  # no iais_rows: no explicit softmax anywhere
    config = model.config
    # two_stream: each stream's layers, and per co-attention block two cross- and two self-attentions.
    assert len(calls) == (
        config.num_layers if architecture == "single_stream" else 2 * config.num_layers + 4 * config.cross_layers
    )


def test_padding_does_not_change_real_tokens():
    model = tiny(visual_embedder="features").eval()
    g = torch.Generator().manual_seed(0)
    feats, pos = torch.randn(2, 4, 64, generator=g), torch.rand(2, 4, 7, generator=g)
    ids = torch.randint(5, 60, (2, 6), generator=g)
    short = dict(visual_feats=feats, visual_pos=pos, visual_mask=torch.ones(2, 4, dtype=torch.bool))
    longer = dict(
        visual_feats=torch.cat([feats, torch.randn(2, 3, 64)], 1),
        visual_pos=torch.cat([pos, torch.rand(2, 3, 7)], 1),
        visual_mask=torch.cat([torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)], 1),
    )
    with torch.no_grad():
        a = model(ids, torch.ones(2, 6, dtype=torch.bool), *model.embed_visual(short)).hidden
        b = model(
            torch.cat([ids, torch.zeros(2, 2, dtype=torch.long)], 1),
            torch.ones(2, 8, dtype=torch.bool).index_fill(1, torch.tensor([6, 7]), False),
            *model.embed_visual(longer),
        ).hidden
    torch.testing.assert_close(b[:, :6], a[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[:, 8:12], a[:, 6:], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = patch_batch()
    rows = torch.tensor([True, True, False])
    results = []
    for checkpointing in (False, True):
        model = tiny(gradient_checkpointing=checkpointing, dropout=0.0, attention_dropout=0.0)
        out = run(model, batch, rows)
        loss = model.itm_logits(out).sum() + out.attention[1].s_ll.sum() + (out.attention[1].s_vv ** 2).sum()
        loss.backward()
        results.append((loss.detach(), model.encoder.layer[0].attention.self.query.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_patch_embedder_boxes_and_interpolated_positions():
    model = tiny(max_visual_tokens=200)
    tokens, mask, boxes = model.embed_visual_with_boxes(patch_batch())
    assert tokens.shape == (3, 64, 64) and mask.all()
    torch.testing.assert_close(boxes[0, 9], torch.tensor([8.0, 8.0, 16.0, 16.0]))  # row 1, col 1
    tokens, _, boxes = model.embed_visual_with_boxes(patch_batch(image=96))  # 12 x 12 patches
    assert tokens.shape == (3, 144, 64) and boxes[0, -1].tolist() == [88.0, 88.0, 96.0, 96.0]
    table = model.visual.positions(12, 12)
    assert table.shape == (1, 144, 64) and torch.isfinite(table).all()
    assert torch.equal(model.visual.positions(8, 8), model.visual.position)


def test_features_embedder_mask_boxes_and_errors():
    model = tiny(visual_embedder="features")
    pos = torch.tensor([[[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16], [0, 0, 1, 1, 1, 1, 1]]])
    batch = dict(
        visual_feats=torch.randn(1, 2, 64),
        visual_pos=pos,
        visual_mask=torch.tensor([[True, False]]),
        image_hw=torch.tensor([[100.0, 200.0]]),
    )
    tokens, mask, boxes = model.embed_visual_with_boxes(batch)
    assert tokens.shape == (1, 2, 64) and mask.tolist() == [[True, False]]
    torch.testing.assert_close(boxes[0, 0], torch.tensor([20.0, 20.0, 100.0, 60.0]))
    with pytest.raises(UserError, match="visual_feats have dimension 32 but model.feature_dim=64"):
        model.embed_visual(dict(batch, visual_feats=torch.randn(1, 2, 32)))
    with pytest.raises(UserError, match="batch has no 'pixel_values'.*visual_embedder=patch"):
        tiny().embed_visual(batch)


def test_too_many_visual_tokens_is_a_user_error():
    with pytest.raises(UserError, match="144 visual tokens per sample exceed model.max_visual_tokens=100"):
        tiny().embed_visual(patch_batch(image=96))


def test_grid_embedder_frozen_pretrained_backbone():
    model = tiny(visual_embedder="grid", grid_trainable=False).train()
    backbone = model.visual.backbone
    assert not backbone.training  # frozen: BatchNorm statistics stay ImageNet's
    first_conv = backbone._conv_stem.weight.detach().clone()
    batch = patch_batch()
    tokens, mask, boxes = model.embed_visual_with_boxes(batch)
    assert tokens.shape == (3, 4, 64) and mask.all()  # 64 px -> 2 x 2 cells at stride 32
    assert boxes[0].tolist() == [[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64]]
    out = model(batch["input_ids"], batch["text_mask"], tokens, mask)
    model.itm_logits(out).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert model.visual.feature_proj.weight.grad is not None
    assert torch.equal(backbone._conv_stem.weight, first_conv)
    assert first_conv.abs().sum() > 0 and first_conv.std() > 0.05  # ImageNet weights, not the 0.02 init


def test_grid_embedder_trainable_and_missing_package(monkeypatch):
    model = tiny(visual_embedder="grid", grid_trainable=True, grid_pretrained=False).train()
    assert model.visual.backbone.training
    tokens, mask = model.embed_visual(patch_batch())
    tokens.sum().backward()
    assert model.visual.backbone._conv_stem.weight.grad is not None
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(UserError, match="visual_embedder=grid needs the packages efficientnet-lite-pytorch"):
        tiny(visual_embedder="grid")


def test_heads_shapes_tying_and_itc():
    model = tiny().eval()
    batch = patch_batch()
    out = run(model, batch)
    assert model.itm_logits(out).shape == (3, 2)
    logits = model.mlm_logits(out)
    assert logits.shape == (3, 10, 60)
    positions = torch.zeros(3, 10, dtype=torch.bool)
    positions[0, 2] = positions[2, 5] = True
    torch.testing.assert_close(model.mlm_logits(out, positions), logits[positions])
    vocab_tables = [n for n, p in model.named_parameters() if p.shape == (60, 64)]
    assert vocab_tables == ["embeddings.word_embeddings.weight"]  # decoder tied, not a second table
    text = model.encode_text(batch["input_ids"], batch["text_mask"])
    tokens, mask = model.embed_visual(batch)
    image = model.encode_image(tokens, mask)
    assert text.shape == image.shape == (3, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    padded = model.encode_text(F.pad(batch["input_ids"], (0, 3)), F.pad(batch["text_mask"], (0, 3)))
    torch.testing.assert_close(padded, text, atol=1e-5, rtol=1e-5)
    assert model.itc_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    # DeepSpeed 0.19.8 cannot broadcast 0-dim parameters (uint8 view): no parameter may be 0-dim.
    assert model.logit_scale.shape == (1,)
    assert [n for n, p in model.named_parameters() if p.ndim == 0] == []
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.itc_scale().item() == pytest.approx(100.0, rel=1e-5)


def test_set_iais_layers_validates():
    model = tiny()
    with pytest.raises(ConfigError, match=r"iais\.layers=\[2\]"):
        model.set_iais_layers([2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("architecture", ["single_stream", "two_stream"])
def test_cuda_bf16_iais_on_off_identical_and_loss_float32(architecture):
    from pretrain.iais import IAISConfig, IAISRegularizer

    model = tiny(dropout=0.0, attention_dropout=0.0, architecture=architecture).cuda()
    batch = {k: v.cuda() for k, v in patch_batch().items()}
    regularizer = IAISRegularizer(IAISConfig(schedule="constant"), model.config.iais_layer_count)
    rows = torch.tensor([True, True, False], device="cuda")
    full = regularizer(run(model, batch, rows).attention, 0, 1).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        off = run(model, batch)
        on = run(model, batch, rows)
        loss = regularizer(on.attention, 0, 1).loss
    assert torch.equal(on.hidden, off.hidden)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(full.item(), rel=0.05)
    loss.backward()
    last = model.encoder.layer[-1] if architecture == "single_stream" else model.co_blocks[-1].text_layer
    assert torch.isfinite(last.attention.self.query.weight.grad).all()
