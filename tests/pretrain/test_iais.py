"""The vectorised IAIS regulariser against the plain reference of DESIGN.md 1, and its properties."""

from __future__ import annotations

import math

import pytest
import torch

from data_tools.errors import ConfigError
from pretrain.iais import (
    IAISConfig,
    IAISRegularizer,
    pair_divergence,
    pair_divergences,
    pseudo_and_target,
    schedule_factor,
    symmetric_kl,
)
from pretrain.model import AttentionBlocks, ModelConfig, RelAlignModel
from pretrain.model.encoder import BlockRequest, attention_blocks

from .iais_reference import reference_loss

MODES = ["singular", "distributed"]
DIRECTIONS = ["L", "V"]
NORMALIZATIONS = ["softmax", "sum"]
WORDS = [5, 3, 6, 1]  # mixed text lengths (one pair with a single word)
VISUAL = [4, 6, 2, 5]  # mixed visual lengths


def make_qk(words=WORDS, visual=VISUAL, heads=2, dim=4, pad_words=0, pad_visual=0, seed=0, dtype=torch.float64):
    """Random Q, K [P, h, L, d] for pairs laid out as [CLS] words [SEP] pad | visual pad."""
    g = torch.Generator().manual_seed(seed)
    n, m = max(words) + pad_words, max(visual) + pad_visual
    text_len = n + 2
    length = text_len + m
    query = torch.randn(len(words), heads, length, dim, generator=g, dtype=dtype) * 1.5
    key = torch.randn(len(words), heads, length, dim, generator=g, dtype=dtype) * 1.5
    word_mask = torch.arange(n)[None] < torch.tensor(words)[:, None]  # [P, n]
    visual_mask = torch.arange(m)[None] < torch.tensor(visual)[:, None]  # [P, m]
    request = BlockRequest(
        rows=torch.arange(len(words)), text_len=text_len, word_mask=word_mask, visual_mask=visual_mask
    )
    return query.requires_grad_(), key.requires_grad_(), request


def vectorised_loss(query, key, request, direction, mode, normalization):
    values, valid = pair_divergence(attention_blocks(query, key, request), direction, mode, normalization)
    return (values * valid).sum() / valid.sum()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_vectorised_matches_reference_in_value_and_gradient(mode, direction, normalization):
    query, key, request = make_qk(seed=hash((mode, direction, normalization)) % 1000)
    loss = vectorised_loss(query, key, request, direction, mode, normalization)
    grads = torch.autograd.grad(loss, (query, key))
    ref = reference_loss(query, key, WORDS, VISUAL, request.text_len, direction, mode, normalization)
    ref_grads = torch.autograd.grad(ref, (query, key))
    assert loss.item() > 1e-3  # a real, non-trivial value
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_float64_reference(mode):
    query, key, request = make_qk(seed=3, dtype=torch.float32)
    loss = vectorised_loss(query, key, request, "L", mode, "softmax")
    ref = reference_loss(query.double(), key.double(), WORDS, VISUAL, request.text_len, "L", mode, "softmax")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck_float64(mode, direction):
    query, key, request = make_qk(words=[3, 2], visual=[2, 3], heads=2, dim=3, seed=7)
    assert torch.autograd.gradcheck(
        lambda q, k: vectorised_loss(q, k, request, direction, mode, "softmax"), (query, key), eps=1e-6, atol=1e-5
    )


def test_distributed_pseudo_matrices_are_row_stochastic():
    query, key, request = make_qk(pad_words=2, pad_visual=3)
    blocks = attention_blocks(query, key, request)
    for direction, mask in (("L", request.word_mask), ("V", request.visual_mask)):
        pseudo, _, _ = pseudo_and_target(blocks, direction, "distributed", "softmax")
        rows = pseudo.sum(dim=-1)[mask]  # real rows
        torch.testing.assert_close(rows, torch.ones_like(rows))
        assert (pseudo.masked_select(~mask[:, None, :].expand_as(pseudo)) == 0).all()  # padded columns get nothing
        assert (pseudo >= 0).all()


def _hand_blocks(normalization: str) -> AttentionBlocks:
    """A pair whose singular pseudo matrices equal its attention: word i <-> visual token i.

    S_VV is any row-stochastic matrix; S_LV / S_VL peak on the diagonal; S_LL is the row
    normalisation of S_VV (softmax or sum), so P_LL = S_LL, and S_VV is chosen so P_VV = S_VV.
    """
    g = torch.Generator().manual_seed(1)
    size, pad = 4, 2
    if normalization == "sum":
        s_vv = torch.softmax(torch.randn(size, size, generator=g, dtype=torch.float64), dim=-1)
        s_ll = s_vv.clone()
    else:
        # Softmax is not idempotent: need S_LL = softmax(S_VV) and S_VV = softmax(S_LL). The fixed point
        # of x -> softmax(x) on rows is uniform, so take uniform rows (a legitimate zero-loss case).
        s_vv = torch.full((size, size), 1.0 / size, dtype=torch.float64)
        s_ll = s_vv.clone()
    cross = torch.full((size, size), 0.1, dtype=torch.float64) + torch.eye(size, dtype=torch.float64)
    cross = cross / cross.sum(-1, keepdim=True)

    def padded(matrix, rows, cols):
        out = torch.rand(rows, cols, generator=g, dtype=torch.float64)  # junk in the padding
        out[:size, :size] = matrix
        return out

    mask = torch.arange(size + pad) < size
    return AttentionBlocks(
        s_ll=padded(s_ll, 6, 6)[None],
        s_vv=padded(s_vv, 6, 6)[None],
        s_lv=padded(cross, 6, 6)[None],
        s_vl=padded(cross, 6, 6)[None],
        word_mask=mask[None],
        visual_mask=mask[None],
    )


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_zero_loss_when_pseudo_equals_attention(normalization, direction):
    blocks = _hand_blocks(normalization)
    values, valid = pair_divergence(blocks, direction, "singular", normalization)
    assert valid.all()
    assert values.abs().max().item() < 1e-12
    # And the same blocks with a non-identity alignment are penalised.
    perm = dict(vars(blocks))
    perm["s_lv"] = blocks.s_lv[:, :, [1, 0, 3, 2, 4, 5]]
    perm["s_vv"] = torch.softmax(torch.randn(1, 6, 6, dtype=torch.float64) * 3, dim=-1)
    values, _ = pair_divergence(AttentionBlocks(**perm), "L", "singular", normalization)
    assert values.item() > 1e-3


def test_symmetric_kl_is_zero_only_for_equal_matrices():
    p = torch.softmax(torch.randn(2, 3, 3, dtype=torch.float64), -1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert symmetric_kl(p, p, mask, distributed=False).abs().max() < 1e-12
    assert (symmetric_kl(p, p.flip(-1), mask, distributed=False) > 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_padding_changes_neither_loss_nor_gradients(mode, direction):
    query, key, request = make_qk(seed=11)
    loss = vectorised_loss(query, key, request, direction, mode, "softmax")
    grad_q, grad_k = torch.autograd.grad(loss, (query, key))
    # Same real tokens, 3 more padded words and 4 more padded visual tokens filled with junk.
    pq, pk, prequest = make_qk(pad_words=3, pad_visual=4, seed=99)
    n, m, text_len = request.word_mask.shape[1], request.visual_mask.shape[1], request.text_len
    with torch.no_grad():
        for target, source in ((pq, query), (pk, key)):
            target[:, :, : n + 1] = source[:, :, : n + 1]  # [CLS] + words
            target[:, :, prequest.text_len : prequest.text_len + m] = source[:, :, text_len:]  # visual
    padded_loss = vectorised_loss(pq, pk, prequest, direction, mode, "softmax")
    pgrad_q, pgrad_k = torch.autograd.grad(padded_loss, (pq, pk))
    assert padded_loss.item() == pytest.approx(loss.item(), abs=1e-12)
    for got, want in ((pgrad_q, grad_q), (pgrad_k, grad_k)):
        torch.testing.assert_close(got[:, :, : n + 1], want[:, :, : n + 1])
        torch.testing.assert_close(got[:, :, prequest.text_len : prequest.text_len + m], want[:, :, text_len:])
        assert got[:, :, n + 1 : prequest.text_len].abs().max() == 0  # padded words
        assert got[:, :, prequest.text_len + m :].abs().max() == 0  # padded visual tokens


def tiny_model(**overrides) -> RelAlignModel:
    torch.manual_seed(0)
    return RelAlignModel(
        ModelConfig.preset(
            "tiny", vocab_size=50, visual_embedder="features", dropout=0.0, attention_dropout=0.0, **overrides
        )
    )


def features_batch(size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_len, m = 9, 6
    text_mask = torch.arange(text_len)[None] < torch.tensor([9, 6, 7, 4][:size])[:, None]
    visual_mask = torch.arange(m)[None] < torch.tensor([6, 3, 5, 4][:size])[:, None]
    return dict(
        input_ids=torch.randint(5, 50, (size, text_len), generator=g) * text_mask,
        text_mask=text_mask,
        visual_feats=torch.randn(size, m, 64, generator=g),
        visual_pos=torch.rand(size, m, 7, generator=g),
        visual_mask=visual_mask,
    )


def test_only_matched_pairs_contribute():
    model = tiny_model()
    regularizer = IAISRegularizer(IAISConfig(schedule="constant"), num_layers=model.config.num_layers)
    model.set_iais_layers(regularizer.layers)
    batch = features_batch()
    matched = torch.tensor([True, False, True, False])

    def iais_loss(b):
        tokens, mask = model.embed_visual(b)
        tokens.retain_grad()
        out = model(b["input_ids"], b["text_mask"], tokens, mask, iais_rows=matched)
        assert next(iter(out.attention.values())).s_ll.shape[0] == 2  # blocks for the matched rows only
        loss = regularizer(out.attention, step=0, total_steps=10).loss
        loss.backward()
        return loss, tokens.grad

    loss, grad = iais_loss(batch)
    assert grad[~matched].abs().max() == 0  # negatives receive no IAIS gradient
    assert grad[matched].abs().max() > 0
    changed = dict(batch, visual_feats=batch["visual_feats"].clone(), input_ids=batch["input_ids"].clone())
    changed["visual_feats"][~matched] += 5.0
    changed["input_ids"][1, 1:4] = 7
    changed_loss, _ = iais_loss(changed)
    assert changed_loss.item() == pytest.approx(loss.item(), abs=1e-6)


def test_regularizer_directions_schedule_and_layers():
    model = tiny_model()
    batch = features_batch()
    tokens, mask = model.embed_visual(batch)
    model.set_iais_layers([0, 1])
    out = model(batch["input_ids"], batch["text_mask"], tokens, mask, iais_rows=torch.ones(4, dtype=torch.bool))
    per = {
        (layer, d): (lambda v: (v[0] * v[1]).sum() / v[1].sum())(pair_divergence(out.attention[layer], d))
        for layer in (0, 1)
        for d in "LV"
    }
    both = IAISRegularizer(IAISConfig(direction="both", layers=[0, -1], weight=0.5, schedule="linear"), 2)
    assert both.layers == [0, 1]
    result = both(out.attention, step=5, total_steps=10)
    mean_l = (per[0, "L"] + per[1, "L"]) / 2
    mean_v = (per[0, "V"] + per[1, "V"]) / 2
    assert result.weight == pytest.approx(0.25)
    assert result.raw.item() == pytest.approx((mean_l + mean_v).item(), rel=1e-6)
    assert result.loss.item() == pytest.approx(0.25 * result.raw.item(), rel=1e-6)
    assert result.isd["L"].item() == pytest.approx(mean_l.item(), rel=1e-6)
    alternate = IAISRegularizer(IAISConfig(direction="alternate", layers=[0, 1], schedule="constant"), 2)
    assert alternate(out.attention, 4, 10).raw.item() == pytest.approx(mean_l.item(), rel=1e-6)
    odd = alternate(out.attention, 5, 10)
    assert odd.raw.item() == pytest.approx(mean_v.item(), rel=1e-6)
    assert odd.isd["L"].item() == pytest.approx(mean_l.item(), rel=1e-6)  # logged even when inactive
    assert not odd.isd["L"].requires_grad
    assert IAISRegularizer.from_config(IAISConfig(enabled=False), 2) is None  # off: no regulariser at all
    assert IAISRegularizer.from_config(IAISConfig(layers=[-1]), 2).layers == [1]


def test_schedules():
    assert schedule_factor("exp", 0.0) == pytest.approx(math.exp(-5))  # 0.0067, the official start
    assert schedule_factor("exp", 1.0) == 1.0
    assert schedule_factor("log", 0.0) == 0.0 and schedule_factor("log", 1.0) == pytest.approx(1 - math.exp(-5))
    assert schedule_factor("linear", 0.3) == 0.3 and schedule_factor("constant", 0.3) == 1.0
    reg = IAISRegularizer(IAISConfig(weight=2.0, schedule="linear"), 4)
    assert reg.weight(50, 100) == 1.0 and reg.weight(500, 100) == 2.0  # p clamped to [0, 1]


@pytest.mark.parametrize(
    "field,value",
    [
        ("mode", "argmax"),
        ("direction", "LV"),
        ("normalization", "l1"),
        ("schedule", "cosine"),
        ("weight", -1.0),
        ("layers", []),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"iais.{field}="):
        IAISConfig(**{field: value})


def test_layer_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"iais.layers=\[6\]"):
        IAISRegularizer(IAISConfig(layers=[6]), num_layers=6)


def test_bf16_autocast_loss_is_float32_and_close():
    model = tiny_model()
    batch = features_batch()
    reg = IAISRegularizer(IAISConfig(schedule="constant"), 2)
    rows = torch.ones(4, dtype=torch.bool)

    def run():
        tokens, mask = model.embed_visual(batch)
        out = model(batch["input_ids"], batch["text_mask"], tokens, mask, iais_rows=rows)
        return reg(out.attention, 0, 1)

    full = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = run()
    assert half.loss.dtype == torch.float32 and torch.isfinite(half.loss)
    assert half.loss.item() == pytest.approx(full.loss.item(), rel=0.05)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", ["both", "alternate"])
def test_no_host_sync_in_blocks_and_loss_on_cuda(mode, direction):
    query, key, request = make_qk(pad_words=2, pad_visual=3, dtype=torch.float32)
    cpu_value = IAISRegularizer(IAISConfig(mode=mode, direction=direction), 1)(
        {0: attention_blocks(query, key, request)}, step=3, total_steps=10
    ).loss.item()
    device = torch.device("cuda")
    q, k = (x.detach().to(device).requires_grad_() for x in (query, key))
    cuda_request = BlockRequest(
        rows=request.rows.to(device),
        text_len=request.text_len,
        word_mask=request.word_mask.to(device),
        visual_mask=request.visual_mask.to(device),
    )
    regularizer = IAISRegularizer(IAISConfig(mode=mode, direction=direction), 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        out = regularizer({0: attention_blocks(q, k, cuda_request)}, step=3, total_steps=10)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.loss.item() == pytest.approx(cpu_value, rel=1e-4)
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_batch_without_matched_pairs_gives_zero_loss_that_backpropagates():
    model = tiny_model()
    regularizer = IAISRegularizer(IAISConfig(), model.config.num_layers)
    batch = features_batch()
    tokens, mask = model.embed_visual(batch)
    out = model(batch["input_ids"], batch["text_mask"], tokens, mask, iais_rows=torch.zeros(4, dtype=torch.bool))
    assert out.attention[1].s_ll.shape[0] == 0
    result = regularizer(out.attention, step=5, total_steps=10)
    assert result.loss.item() == 0.0 and result.loss.requires_grad
    (result.loss + model.itm_logits(out).sum()).backward()  # a step with only negatives still trains


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_regularizer_mean_inside_the_fused_node_matches_the_reference_with_an_invalid_pair(mode, normalization):
    # Pair 3 has no real visual token: it is left out of the mean, and gets no gradient.
    words, visual = [5, 3, 6, 2], [4, 6, 2, 0]
    query, key, request = make_qk(words=words, visual=visual, pad_words=1, pad_visual=2, seed=5)
    regularizer = IAISRegularizer(
        IAISConfig(mode=mode, normalization=normalization, direction="both", schedule="constant"), 1
    )
    loss = regularizer({0: attention_blocks(query, key, request)}, step=0, total_steps=1).raw
    grads = torch.autograd.grad(loss, (query, key))
    ref = sum(
        reference_loss(query[:3], key[:3], words[:3], visual[:3], request.text_len, d, mode, normalization)
        for d in ("L", "V")
    )
    ref_grads = torch.autograd.grad(ref, (query, key))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got[:3], want[:3], atol=1e-5, rtol=1e-5)
        assert got[3].abs().max() == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_logged_direction_gets_no_gradient(mode):
    query, key, request = make_qk(seed=8)
    regularizer = IAISRegularizer(IAISConfig(mode=mode, direction="L", schedule="constant"), 1)
    out = regularizer({0: attention_blocks(query, key, request)}, step=0, total_steps=1)
    grads = torch.autograd.grad(out.raw, (query, key))
    ref = reference_loss(query, key, WORDS, VISUAL, request.text_len, "L", mode, "softmax")
    for got, want in zip(grads, torch.autograd.grad(ref, (query, key))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert out.isd["V"].item() > 1e-3 and not out.isd["V"].requires_grad  # still measured, for logging


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_exact_zeros_on_real_columns_match_the_plain_statement(mode, normalization):
    # Attention that underflowed to exactly 0 on real columns (below the log floor): the fused backward's
    # [x >= floor] branches against autograd through iais.py's plain formulation (the same clamps).
    g = torch.Generator().manual_seed(11)
    word_mask = torch.tensor([[True] * 5 + [False], [True] * 3 + [False] * 3])
    visual_mask = torch.tensor([[True] * 4, [True] * 3 + [False]])

    def rows(p, r, c, mask, zeros):
        x = torch.rand(p, r, c, generator=g, dtype=torch.float64) * mask[:, None, :]
        if zeros:  # exact zeros on real columns too; every row keeps a real entry (the diagonal)
            x[x < 0.4] = 0.0
            x += torch.eye(r, c, dtype=x.dtype) * mask[:, None, :]
        return x / x.sum(-1, keepdim=True).clamp_min(1e-300)

    blocks = [
        rows(2, 6, 6, word_mask, True),
        rows(2, 4, 4, visual_mask, True),
        rows(2, 6, 4, visual_mask, False),
        rows(2, 4, 6, word_mask, False),
    ]
    fused_in = [b.clone().requires_grad_() for b in blocks]
    plain_in = [b.clone().requires_grad_() for b in blocks]
    values, _ = pair_divergences(AttentionBlocks(*fused_in, word_mask, visual_mask), mode, normalization)
    plain_blocks = AttentionBlocks(*plain_in, word_mask, visual_mask)
    plain = torch.stack(
        [
            symmetric_kl(*pseudo_and_target(plain_blocks, d, mode, normalization), distributed=mode == "distributed")
            for d in ("L", "V")
        ]
    )
    torch.testing.assert_close(values, plain, atol=1e-12, rtol=1e-10)
    weights = torch.tensor([[0.7, 1.3], [-0.4, 2.0]], dtype=torch.float64)
    got = torch.autograd.grad((values * weights).sum(), fused_in, allow_unused=True)
    want = torch.autograd.grad((plain * weights).sum(), plain_in, allow_unused=True)
    real = [
        (r[:, :, None] & c[:, None, :]).double()
        for r, c in (  # padded entries' gradients are meaningless
            (word_mask, word_mask),
            (visual_mask, visual_mask),
            (word_mask, visual_mask),
            (visual_mask, word_mask),
        )
    ]
    for index, (got_grad, want_grad, mask) in enumerate(zip(got, want, real)):
        chooses_only = mode == "singular" and index >= 2  # singular: the cross blocks only pick the argmax
        assert (got_grad is None) == (want_grad is None) == chooses_only
        if not chooses_only:
            assert torch.isfinite(got_grad).all()
            torch.testing.assert_close(got_grad * mask, want_grad * mask, atol=1e-9, rtol=1e-9)
