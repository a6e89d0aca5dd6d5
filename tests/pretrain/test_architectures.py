"""The architectures of `model.architecture`, in process and fast:

- two_stream: IAIS blocks and loss at a co-attention block equal a direct, per-sample implementation of
  DESIGN.md 1 *Other architectures* (value and gradient, singular and distributed); the output is the
  same with IAIS on and off; the one interface (ITM, MLM, ITC) works;
- dual_encoder: two towers, no joint pass, ITC only;
- the `tiny` presets of the three architectures have parameter counts within 10% of each other;
- what an architecture cannot do is one configuration line, exit 2, before any process starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_tools.errors import ConfigError, ExitCode, run_cli
from data_tools.synthetic import GRAMMAR_WORDS
from data_tools.wordpiece import grammar_vocabulary
from pretrain.iais import IAISConfig, IAISRegularizer
from pretrain.model import ARCHITECTURES, DualEncoderModel, ModelConfig, TwoStreamModel, build_model
from tests.pretrain.iais_reference import reference_pair_loss

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
VOCAB = 50


def _two_stream(cross_layers: int = 2) -> TwoStreamModel:
    torch.manual_seed(0)
    config = ModelConfig.preset(
        "tiny",
        vocab_size=VOCAB,
        architecture="two_stream",
        width=16,
        num_heads=2,
        num_layers=1,
        cross_layers=cross_layers,
        embed_dim=8,
    )
    return build_model(config).double()


def _inputs(width: int = 16):
    """3 pairs with padded words and padded visual tokens; rows 0 and 2 are the matched pairs."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, VOCAB, (3, 7), generator=generator)
    text_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 4 + [0] * 3]).bool()  # [B, Lt]
    visual_tokens = torch.randn(3, 5, width, generator=generator, dtype=torch.float64)
    visual_mask = torch.tensor([[1] * 5, [1] * 5, [1] * 3 + [0] * 2]).bool()  # [B, M]
    rows = torch.tensor([True, False, True])
    return input_ids, text_mask, visual_tokens, visual_mask, rows


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # [L, W] -> [h, L, d]
    return x.view(x.shape[0], heads, -1).transpose(0, 1)


def _attention(linear_q, linear_k, linear_v, queries: torch.Tensor, keys: torch.Tensor, heads: int):
    """One sample, real tokens only: (probabilities [h, Lq, Lk], context [Lq, W]), written out."""
    q, k, v = _heads(linear_q(queries), heads), _heads(linear_k(keys), heads), _heads(linear_v(keys), heads)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return probs, (probs @ v).transpose(0, 1).reshape(queries.shape[0], -1)


def _residual(output, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(
        output.dense(context) + residual,
        residual.shape[-1:],
        output.LayerNorm.weight,
        output.LayerNorm.bias,
        output.LayerNorm.eps,
    )


def _reference_blocks(block, text: torch.Tensor, visual: torch.Tensor, heads: int):
    """One sample's S_LL, S_VV, S_LV, S_VL at a co-attention block from its inputs (real tokens only:
    text = [CLS] words [SEP], visual = real tokens), straight from the text of DESIGN.md 1."""
    words = slice(1, text.shape[0] - 1)
    tc, vc = block.text_cross, block.visual_cross
    p_lv, text_ctx = _attention(tc.self.query, tc.self.key, tc.self.value, text, visual, heads)
    p_vl, visual_ctx = _attention(vc.self.query, vc.self.key, vc.self.value, visual, text, heads)
    text_x, visual_x = _residual(tc.output, text_ctx, text), _residual(vc.output, visual_ctx, visual)
    ts, vs = block.text_layer.attention.self, block.visual_layer.attention.self
    q_t, k_t = _heads(ts.query(text_x), heads)[:, words], _heads(ts.key(text_x), heads)[:, words]
    q_v, k_v = _heads(vs.query(visual_x), heads), _heads(vs.key(visual_x), heads)
    scale = q_t.shape[-1] ** -0.5
    s_ll = torch.softmax(q_t @ k_t.transpose(-1, -2) * scale, dim=-1).mean(0)  # [n, n], words only
    s_vv = torch.softmax(q_v @ k_v.transpose(-1, -2) * scale, dim=-1).mean(0)  # [m, m]
    # Cross blocks restricted to words: recompute over word keys only (the block-restricted softmax).
    q_lv = _heads(tc.self.query(text), heads)[:, words]
    s_lv = torch.softmax(q_lv @ _heads(tc.self.key(visual), heads).transpose(-1, -2) * scale, dim=-1).mean(0)
    k_vl = _heads(vc.self.key(text), heads)[:, words]
    s_vl = torch.softmax(_heads(vc.self.query(visual), heads) @ k_vl.transpose(-1, -2) * scale, dim=-1).mean(0)
    assert torch.allclose(s_lv, p_lv[:, words].mean(0))  # text queries over all visual keys: the same block
    return s_ll, s_vv, s_lv, s_vl


@pytest.mark.parametrize("mode", ["singular", "distributed"])
def test_two_stream_iais_blocks_and_loss_match_the_direct_formulas(mode: str) -> None:
    model = _two_stream().eval()
    block_index = 1
    block = model.co_blocks[block_index]
    captured = {}
    block.register_forward_pre_hook(
        lambda module, args: captured.update(text=args[0].detach(), visual=args[1].detach())
    )
    model.set_iais_layers({block_index})
    input_ids, text_mask, visual_tokens, visual_mask, rows = _inputs()
    out = model(input_ids, text_mask, visual_tokens, visual_mask, iais_rows=rows)
    regularizer = IAISRegularizer(IAISConfig(mode=mode, direction="both", schedule="constant"), 2)
    regularizer.layers = [block_index]
    loss = regularizer(out.attention, step=0, total_steps=1).raw
    params = list(block.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    expected, ref_blocks = [], []
    for row in rows.nonzero().flatten().tolist():
        lt, m = int(text_mask[row].sum()), int(visual_mask[row].sum())
        s = _reference_blocks(block, captured["text"][row, :lt], captured["visual"][row, :m], model.config.num_heads)
        ref_blocks.append(s)
        expected.append(sum(reference_pair_loss(*s, direction, mode, "softmax") for direction in ("L", "V")))
    reference = torch.stack(expected).mean()
    ref_grads = torch.autograd.grad(reference, params, allow_unused=True)

    blocks = out.attention[block_index]
    for p, (s_ll, s_vv, s_lv, s_vl) in enumerate(ref_blocks):
        n, m = s_lv.shape
        assert torch.allclose(blocks.s_ll[p, :n, :n], s_ll) and torch.allclose(blocks.s_vv[p, :m, :m], s_vv)
        assert torch.allclose(blocks.s_lv[p, :n, :m], s_lv) and torch.allclose(blocks.s_vl[p, :m, :n], s_vl)
        assert blocks.word_mask[p].sum() == n and blocks.visual_mask[p].sum() == m
    assert torch.allclose(loss, reference, rtol=1e-9, atol=1e-12), (loss, reference)
    checked = 0
    for name, g, r in zip([n for n, _ in block.named_parameters()], grads, ref_grads):
        if r is None:
            assert g is None or not g.any(), name
            continue
        assert g is not None and torch.allclose(g, r, rtol=1e-7, atol=1e-10), name
        checked += int(r.abs().sum() > 0)
    assert checked >= 8  # the cross projections and the self-attention query/key of both streams


def test_two_stream_output_is_identical_with_iais_on_and_off_and_blocks_only_where_asked() -> None:
    model = _two_stream().eval()
    input_ids, text_mask, visual_tokens, visual_mask, rows = _inputs()
    model.set_iais_layers({0})
    on = model(input_ids, text_mask, visual_tokens, visual_mask, iais_rows=rows)
    off = model(input_ids, text_mask, visual_tokens, visual_mask)
    assert list(on.attention) == [0] and off.attention == {}
    assert torch.equal(on.hidden, off.hidden)
    assert torch.equal(model.itm_logits(on), model.itm_logits(off))
    assert on.attention[0].s_ll.shape == (2, 5, 5) and on.attention[0].s_vl.shape == (2, 5, 5)
    with pytest.raises(Exception, match="iais.layers.*co-attention block"):
        model.set_iais_layers({2})


def test_two_stream_interface_shapes_and_unimodal_itc() -> None:
    model = _two_stream(cross_layers=1).eval()
    input_ids, text_mask, visual_tokens, visual_mask, _ = _inputs()
    out = model(input_ids, text_mask, visual_tokens, visual_mask)
    assert out.hidden.shape == (3, 7 + 5, 16) and out.text_len == 7
    assert model.itm_logits(out).shape == (3, 2)
    assert model.mlm_logits(out).shape == (3, 7, VOCAB)
    assert model.mlm_logits(out, text_mask).shape == (int(text_mask.sum()), VOCAB)
    text, image = model.encode_text(input_ids, text_mask), model.encode_image(visual_tokens, visual_mask)
    assert text.shape == image.shape == (3, 8)
    # ITC is unimodal: the text embedding does not depend on the image, nor the image's on the text.
    with torch.no_grad():
        for p in model.co_blocks.parameters():
            p.add_(1.0)
    assert torch.equal(model.encode_text(input_ids, text_mask), text)
    assert torch.equal(model.encode_image(visual_tokens, visual_mask), image)


def test_dual_encoder_is_two_towers_without_a_joint_pass() -> None:
    torch.manual_seed(0)
    model = (
        build_model(
            ModelConfig.preset(
                "tiny", vocab_size=VOCAB, architecture="dual_encoder", width=16, num_heads=2, embed_dim=8
            )
        )
        .double()
        .eval()
    )
    assert isinstance(model, DualEncoderModel) and model.iais_layers == frozenset()
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"embeddings", "visual", "visual_norm", "encoder", "visual_encoder", "itc", "logit_scale"}
    input_ids, text_mask, visual_tokens, visual_mask, rows = _inputs()
    text, image = model.encode_text(input_ids, text_mask), model.encode_image(visual_tokens, visual_mask)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    assert image.shape == (3, 8)
    with pytest.raises(RuntimeError, match="dual_encoder has no joint pass"):
        model(input_ids, text_mask, visual_tokens, visual_mask, iais_rows=rows)
    with pytest.raises(Exception, match="iais.layers"):
        model.set_iais_layers({0})


def test_dual_encoder_image_tower_depth_and_a_projection_only_tower() -> None:
    """model.visual_layers sets the image tower's depth (null: num_layers); 0 leaves the embedder, LayerNorm,
    masked mean and image_proj, the contract written out directly; other architectures refuse the field."""
    from pretrain.model.heads import masked_mean

    def dual(layers):
        config = ModelConfig.preset(
            "tiny",
            vocab_size=VOCAB,
            architecture="dual_encoder",
            width=16,
            num_heads=2,
            embed_dim=8,
            visual_layers=layers,
        )
        return build_model(config).double().eval()

    torch.manual_seed(0)
    assert len(dual(None).visual_encoder.layer) == 2 and len(dual(1).visual_encoder.layer) == 1
    model = dual(0)
    assert len(model.visual_encoder.layer) == 0 and len(model.encoder.layer) == 2
    _, _, visual_tokens, visual_mask, _ = _inputs()
    expected = F.normalize(model.itc.image_proj(masked_mean(visual_tokens, visual_mask.bool())), dim=-1)
    assert torch.allclose(model.encode_image(visual_tokens, visual_mask), expected)
    for bad, arch in ((-1, "dual_encoder"), (True, "dual_encoder"), (1, "single_stream"), (0, "two_stream")):
        with pytest.raises(ConfigError, match="model.visual_layers"):
            ModelConfig.preset("tiny", vocab_size=VOCAB, architecture=arch, visual_layers=bad)


def test_tiny_presets_have_parameter_counts_within_10_percent() -> None:
    """The controlled comparison's premise (VOLTA): equal size at `tiny`, at the synthetic scenes' vocabulary."""
    vocab = len(grammar_vocabulary(GRAMMAR_WORDS))
    counts = {}
    for arch, preset in (
        ("single_stream", "tiny"),
        ("two_stream", "tiny_two_stream"),
        ("dual_encoder", "tiny_dual_encoder"),
    ):
        model = build_model(ModelConfig.preset(preset, vocab_size=vocab))
        assert model.config.architecture == arch
        counts[arch] = sum(p.numel() for p in model.parameters())
    print(
        "\n| architecture | preset parameters |\n|---|---|\n"
        + "\n".join(f"| {arch} | {count} |" for arch, count in counts.items())
    )
    assert set(counts) == set(ARCHITECTURES)
    assert max(counts.values()) <= 1.1 * min(counts.values()), counts


DUAL = ("model.preset=tiny_dual_encoder",)
DUAL_ITC = (*DUAL, "objectives.itm=false", "objectives.mlm=false", "iais.enabled=false")


@pytest.mark.parametrize(
    "module, overrides, field, words",
    [
        (
            "pretrain",
            ("model.architecture=triple",),
            "model.architecture",
            "'single_stream' | 'two_stream' | 'dual_encoder'",
        ),
        ("pretrain", ("model.architecture=two_stream", "model.cross_layers=0"), "model.cross_layers", ">= 1"),
        ("pretrain", DUAL, "iais.enabled", "IAIS is undefined"),
        ("pretrain", (*DUAL, "iais.enabled=false"), "objectives.itm.enabled", "ITC is its only objective"),
        (
            "pretrain",
            (*DUAL, "iais.enabled=false", "objectives.itm=false"),
            "objectives.mlm.enabled",
            "nothing attends across the modalities",
        ),
        ("pretrain", ("model.preset=tiny_two_stream", "iais.layers=[1]"), "iais.layers", "co-attention blocks"),
        ("pretrain", ("iais.layers=[2]",), "iais.layers", "encoder layers (model.num_layers=2)"),
        ("finetune", DUAL_ITC, "finetune.recipe", "itc for model.architecture=dual_encoder"),
        ("finetune", (*DUAL_ITC, "finetune.recipe=itc_itm"), "finetune.recipe", "no ITM"),
        ("finetune", (*DUAL_ITC, "finetune.recipe=itc"), "finetune.eval_mode", "embedding"),
    ],
)
def test_what_an_architecture_cannot_do_is_one_line_exit_2(
    capsys, dataset: Path, tmp_path: Path, module: str, overrides: tuple[str, ...], field: str, words: str
) -> None:
    if module == "pretrain":
        from pretrain.__main__ import main
    else:
        from finetune.__main__ import main
    run_dir = tmp_path / "run"
    code = run_cli(main, ["--config", str(TINY), f"data.paths=[{dataset}]", f"run.dir={run_dir}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.USAGE == 2
    assert len(err.splitlines()) == 1, err
    assert f"{field}=" in err and words in err, err
    assert not run_dir.exists()  # refused before anything ran


def test_dual_encoder_itc_only_configuration_is_accepted(dataset: Path) -> None:
    from finetune.config import load_finetune_config
    from pretrain.config import load_config

    cfg = load_config(TINY, [f"data.paths=[{dataset}]", *DUAL_ITC])
    assert cfg.model.architecture == "dual_encoder" and cfg.model.width == 48
    cfg = load_finetune_config(
        TINY, [f"data.paths=[{dataset}]", *DUAL_ITC, "finetune.recipe=itc", "finetune.eval_mode=embedding"]
    )
    assert cfg.finetune.recipe == "itc"


def test_two_stream_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    input_ids, text_mask, visual_tokens, visual_mask, rows = _inputs()

    def loss_and_grads(recompute: bool):
        model = _two_stream().train()
        model.config.gradient_checkpointing = recompute
        out = model(input_ids, text_mask, visual_tokens, visual_mask, iais_rows=rows)
        regularizer = IAISRegularizer(IAISConfig(schedule="constant"), 2)
        regularizer.attach(model)
        loss = (
            model.itm_logits(out).sum()
            + model.mlm_logits(out, text_mask).logsumexp(-1).sum()
            + regularizer(out.attention, 0, 1).raw
        )
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(False)
    loss_r, grads_r = loss_and_grads(True)
    assert torch.equal(loss, loss_r) and grads.keys() == grads_r.keys()
    assert all(torch.allclose(grads[n], grads_r[n], rtol=1e-10, atol=1e-12) for n in grads)
    assert any(n.startswith("co_blocks.1.text_cross") for n in grads)
