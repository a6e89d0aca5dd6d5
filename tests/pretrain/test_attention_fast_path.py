"""The fused attention's fast path: keys known on the host to have no padding get no mask at all, the
others one additive [B, 1, 1, L] mask; outputs and gradients equal those of a boolean [B, 1, 1, L] mask
on every key (how attention was masked before), padded or not, in every architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_tools.collate import load_tokenizer
from data_tools.synthetic import GRAMMAR_WORDS
from data_tools.transforms import normalise_batch
from data_tools.wordpiece import write_vocab_tokenizer
from pretrain.model import ModelConfig, build_model
from pretrain.model import encoder as encoder_module
from pretrain.model import two_stream as two_stream_module
from pretrain.model.masks import attention_bias, is_unpadded, mark_unpadded
from pretrain.objectives import Progress
from pretrain.task import PretrainTask
from tests.pretrain.test_host_syncs import loader_batch, tiny_config

VOCAB = 50


def bool_mask(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The reference: every key masked with a bool [B, 1, 1, L] (a row without real keys sees its first)."""
    key_mask = key_mask.bool().clone()
    key_mask[:, 0] |= ~key_mask.any(dim=1)
    return key_mask[:, None, None, :]


def _model(architecture: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig.preset(
        "tiny", vocab_size=VOCAB, architecture=architecture, width=16, num_heads=2, num_layers=2, embed_dim=8
    )
    model = build_model(config).double().eval()
    if config.cross_modal:
        model.set_iais_layers({config.iais_layer_count - 1})
    return model


def _inputs(padded: bool):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, VOCAB, (3, 7), generator=generator)
    visual_tokens = torch.randn(3, 5, 16, generator=generator, dtype=torch.float64)
    if padded:
        text_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 4 + [0] * 3]).bool()
        visual_mask = torch.tensor([[1] * 5, [1] * 5, [1] * 3 + [0] * 2]).bool()
    else:
        text_mask = mark_unpadded(torch.ones(3, 7, dtype=torch.bool))
        visual_mask = mark_unpadded(torch.ones(3, 5, dtype=torch.bool))
    return input_ids, text_mask, visual_tokens.requires_grad_(), visual_mask, torch.tensor([0, 2])


def _passes(model, input_ids, text_mask, visual_tokens, visual_mask, rows) -> dict[str, torch.Tensor]:
    """Every attention pass of the architecture: its outputs (and IAIS blocks) by name."""
    out = {"text": model.encode_text(input_ids, text_mask), "image": model.encode_image(visual_tokens, visual_mask)}
    if model.config.cross_modal:
        joint = model(input_ids, text_mask, visual_tokens, visual_mask, iais_rows=rows)
        out["joint"] = joint.hidden
        out["itm"] = model.itm_logits(joint)
        for layer, blocks in joint.attention.items():
            for name in ("s_ll", "s_vv", "s_lv", "s_vl"):
                out[f"{name}{layer}"] = getattr(blocks, name)
    return out


def _values_and_grads(model, inputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    visual_tokens = inputs[2]
    visual_tokens.grad = None
    out = _passes(model, *inputs)
    loss = sum((value.double() * (i + 1)).sin().sum() for i, value in enumerate(out.values()))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["visual_tokens"] = visual_tokens.grad.clone()
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("architecture", ["single_stream", "two_stream", "dual_encoder"])
def test_outputs_and_gradients_equal_the_boolean_mask_path(
    architecture: str, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(architecture)
    inputs = _inputs(padded)
    fast, fast_grads = _values_and_grads(model, inputs)
    for module in (encoder_module, two_stream_module):
        monkeypatch.setattr(module, "attention_bias", bool_mask)
    reference, reference_grads = _values_and_grads(model, inputs)
    assert fast.keys() == reference.keys() and fast_grads.keys() == reference_grads.keys()
    for name in reference:
        assert torch.allclose(fast[name], reference[name], rtol=1e-12, atol=1e-12), name
    for name in reference_grads:
        assert torch.allclose(fast_grads[name], reference_grads[name], rtol=1e-10, atol=1e-12), name


def test_attention_bias_is_none_only_for_marked_masks() -> None:
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert attention_bias(None, torch.float32) is None
    bias = attention_bias(mask, torch.float32)  # all True, but not known on the host
    assert bias.shape == (2, 1, 1, 4) and not bias.any()
    assert attention_bias(mark_unpadded(mask), torch.float32) is None and is_unpadded(mask)
    assert not is_unpadded(mask.clone())  # a new tensor is not marked


def _record_sdpa(monkeypatch: pytest.MonkeyPatch) -> list:
    calls = []
    original = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((tuple(key.shape), attn_mask))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


SAME_LENGTH = ["a red circle", "a blue square", "a green triangle"]  # 3 word pieces each


@pytest.mark.parametrize("architecture", ["single_stream", "two_stream", "dual_encoder"])
def test_a_training_step_without_padding_gives_sdpa_no_mask(
    architecture: str, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = load_tokenizer(write_vocab_tokenizer(GRAMMAR_WORDS, dataset / "tok"))
    task = PretrainTask(tiny_config(architecture, dataset), categories=[])
    torch.manual_seed(0)
    model = task.build_model(tokenizer, fresh=True, say=lambda text: None)
    objective = task.objective()

    unpadded = normalise_batch(
        loader_batch(tokenizer, samples=4, padding_slots=0, max_text_len=5, captions=SAME_LENGTH)
    )
    assert unpadded["text_unpadded"] and unpadded["text_mask"].all()
    calls = _record_sdpa(monkeypatch)
    objective(model, unpadded, Progress(0, 10)).total.backward()
    assert calls and all(mask is None for _, mask in calls), [(shape, type(mask)) for shape, mask in calls]

    padded = normalise_batch(loader_batch(tokenizer, samples=4, padding_slots=1, max_text_len=12))
    assert not padded["text_unpadded"]
    calls.clear()
    objective(model, padded, Progress(0, 10))
    visual_tokens = model.config.num_patches
    for key_shape, mask in calls:  # keys over visual tokens only (patch embedder: never padded): no mask
        if key_shape[2] == visual_tokens:
            assert mask is None, key_shape
        else:  # keys over padded text: one additive [B, 1, 1, L] mask in the query's dtype
            assert mask is not None and mask.dtype == torch.float32 and mask.shape[1:3] == (1, 1), key_shape
    assert any(mask is None for _, mask in calls) and any(mask is not None for _, mask in calls)
