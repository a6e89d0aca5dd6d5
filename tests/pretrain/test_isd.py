"""ISD and ISDa: on synthetic scenes, attention that agrees with the phrase-to-box links scores lower."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import synthetic
from pretrain.iais import pair_divergence
from pretrain.isd import blocks_isda, box_iou, measure_isd, measure_isda, token_in_box
from pretrain.model import AttentionBlocks, ModelConfig, RelAlignModel
from pretrain.model.visual import cell_boxes

IMAGE, PATCH = 64, 8
RELATION = torch.tensor([[0.9, 0.1], [0.4, 0.6]], dtype=torch.float64)
"""Phrase-level relations (row-stochastic, not symmetric under swapping the phrases)."""


def scene_annotations(index: int):
    """Words, the two phrases of caption 0 as word positions, and the linked boxes (x1, y1, x2, y2)."""
    scene = synthetic.render_scene(seed=7, index=index, image_size=IMAGE)
    caption = scene.captions[0]
    starts, pos = [], 0
    for word in caption.split():
        pos = caption.index(word, pos)
        starts.append((pos, pos + len(word)))
        pos += len(word)
    phrases = [p for p in scene.phrases if p["caption"] == 0]
    tokens = [[i + 1 for i, (s, e) in enumerate(starts) if s < p["span"][1] and e > p["span"][0]] for p in phrases]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in scene.boxes], dtype=torch.float32)
    return scene, len(starts), tokens, [p["boxes"] for p in phrases], boxes


def relation_attention(labels: torch.Tensor, relation: torch.Tensor, background: float = 0.05) -> torch.Tensor:
    """Attention [r, r] where a token of phrase p spreads relation[p, q] over the tokens of phrase q.

    labels [r]: phrase of each token, -1 for tokens outside every phrase (they get the background mass).
    """
    size = labels.shape[0]
    att = torch.full((size, size), background, dtype=torch.float64)
    for q in range(relation.shape[0]):
        members = labels == q
        for p in range(relation.shape[0]):
            rows = labels == p
            att[rows[:, None] & members[None, :]] = relation[p, q] / members.sum()
    return att / att.sum(-1, keepdim=True)


def hand_blocks(index: int, swap_image: bool):
    scene, words, tokens, links, boxes = scene_annotations(index)
    token_boxes = cell_boxes(IMAGE // PATCH, IMAGE // PATCH, PATCH, PATCH, torch.device("cpu"))  # [64, 4]
    word_labels = torch.full((words,), -1)
    for p, positions in enumerate(tokens):
        word_labels[torch.tensor(positions) - 1] = p
    inside = token_in_box(token_boxes[None], boxes[None], "cell")[0]  # [64, K]
    visual_labels = torch.full((token_boxes.shape[0],), -1)
    for p, box_ids in enumerate(links):
        phrase = 1 - p if swap_image else p  # contradicting: each box carries the other phrase's relations
        visual_labels[inside[:, box_ids].any(-1)] = phrase
    s_ll = relation_attention(word_labels, RELATION)
    s_vv = relation_attention(visual_labels, RELATION)
    m = token_boxes.shape[0]
    blocks = AttentionBlocks(
        s_ll=s_ll[None],
        s_vv=s_vv[None],
        s_lv=torch.full((1, words, m), 1.0 / m),
        s_vl=torch.full((1, m, words), 1.0 / words),
        word_mask=torch.ones(1, words, dtype=torch.bool),
        visual_mask=torch.ones(1, m, dtype=torch.bool),
    )
    return blocks, token_boxes[None], [tokens], [links], [boxes]


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_isda_lower_when_attention_agrees_with_links(index):
    agree, *annotations = hand_blocks(index, swap_image=False)
    contradict, *_ = hand_blocks(index, swap_image=True)
    agree_value, agree_valid = blocks_isda(agree, annotations[0], "cell", *annotations[1:])
    contra_value, contra_valid = blocks_isda(contradict, annotations[0], "cell", *annotations[1:])
    assert agree_valid.all() and contra_valid.all()
    assert agree_value.item() < 1e-9  # identical phrase-level relations
    assert contra_value.item() > 0.1
    assert agree_value.item() < contra_value.item()


def test_region_tokens_match_by_iou():
    tokens = torch.tensor([[[0, 0, 10, 10], [0, 0, 4, 4], [20, 20, 30, 30]]], dtype=torch.float32)
    boxes = torch.tensor([[[1, 1, 10, 10]]], dtype=torch.float32)
    assert box_iou(tokens, boxes)[0, :, 0].tolist()[0] == pytest.approx(0.81)
    assert token_in_box(tokens, boxes, "region")[0, :, 0].tolist() == [True, False, False]
    assert token_in_box(tokens, boxes, "cell")[0, :, 0].tolist() == [True, True, False]  # centres (5,5), (2,2)


def test_pairs_with_one_linked_phrase_are_skipped():
    blocks, token_boxes, tokens, links, boxes = hand_blocks(0, swap_image=False)
    value, valid = blocks_isda(blocks, token_boxes, "cell", [tokens[0][:1]], [links[0][:1]], boxes)
    assert valid.tolist() == [False]


def synthetic_batch(count: int = 3):
    """A patch-model batch from synthetic scenes (whitespace words as tokens, ids from a tiny vocabulary)."""
    vocab = {w: i + 5 for i, w in enumerate(synthetic.GRAMMAR_WORDS)}
    pixels, ids, masks, tokens, links, boxes = [], [], [], [], [], []
    for index in range(count):
        scene, words, phrase_tokens, phrase_links, scene_boxes = scene_annotations(index)
        image = np.asarray(Image.open(io.BytesIO(scene.image)).convert("RGB"), dtype=np.float32) / 255.0
        pixels.append(torch.from_numpy(image).permute(2, 0, 1) * 2 - 1)
        row = [1] + [vocab[w] for w in scene.captions[0].split()] + [2]
        ids.append(row + [0] * (16 - len(row)))
        masks.append([True] * len(row) + [False] * (16 - len(row)))
        tokens.append(phrase_tokens), links.append(phrase_links), boxes.append(scene_boxes)
    return dict(
        pixel_values=torch.stack(pixels),
        input_ids=torch.tensor(ids),
        text_mask=torch.tensor(masks),
        sample_mask=torch.ones(count, dtype=torch.bool),
        boxes=boxes,
        phrase_tokens=tokens,
        phrase_boxes=links,
    )


def test_measure_isd_and_isda_on_a_model():
    torch.manual_seed(0)
    model = RelAlignModel(
        ModelConfig.preset("tiny", vocab_size=64, dropout=0.1, attention_dropout=0.1)
    ).train()  # dropout: eval mode shows
    batch = synthetic_batch()
    isd = measure_isd(model, [batch, batch])
    assert model.training  # restored after the eval-mode measurement
    assert isd["pairs"] == 6 and isd["L"] > 0 and isd["V"] > 0
    model.eval()
    with torch.no_grad():
        tokens, mask = model.embed_visual(batch)
        out = model(batch["input_ids"], batch["text_mask"], tokens, mask, iais_rows=batch["sample_mask"])
    values, valid = pair_divergence(out.attention[1], "L")
    expected = values[valid].mean().item()
    assert isd["L"] == pytest.approx(expected, rel=1e-5)
    isda = measure_isda(model, [batch])
    assert isda["pairs"] == 3 and np.isfinite(isda["isda"]) and isda["isda"] >= 0
