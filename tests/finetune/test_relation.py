"""Relation sensitivity: hand-computed shares, SugarCrepe-format fixtures, the three forms of a
sample's `negatives`, and the one-line errors for bad pairs files."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from data_tools.errors import BadSample, ExitCode, UserError
from finetune import relation
from finetune.eval_data import parse_negatives

KW = dict(max_text_len=64, visual="pixels", image_size=64, batch_size=4)


def test_shares_by_kind_hand_computed():
    true = torch.tensor([2.0, 1.0, 0.5, 3.0, 1.0])
    negative = torch.tensor([1.0, 1.0, 0.7, 0.0, 0.0])  # the tie (row 1) is a miss
    got = relation.shares(true, negative, ["rel", "rel", "att", "att", "att"])
    assert got == {
        "att": {"accuracy": 2 / 3, "count": 3},
        "rel": {"accuracy": 0.5, "count": 2},
        "all": {"accuracy": 3 / 5, "count": 5},
    }


def test_negatives_in_three_forms():
    parsed = parse_negatives(
        [
            [0, "a"],
            [1, "b", "replace_rel"],
            {"caption": 2, "text": "c", "kind": "swap_att"},
            {"caption": 0, "text": "d"},
        ],
        "k",
    )
    assert parsed == [(0, "a", "unknown"), (1, "b", "replace_rel"), (2, "c", "swap_att"), (0, "d", "unknown")]
    for bad in ([["x", "a"]], [[0]], [{"text": "a"}], [[0, "a", "k", "extra"]]):
        with pytest.raises(BadSample):
            parse_negatives(bad, "k")


def write_image(path, colour):
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


@pytest.fixture
def sugarcrepe(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("a.png", (200, 0, 0)), ("b.png", (0, 200, 0)), ("c.png", (0, 0, 200))):
        write_image(images / name, colour)
    rel = {
        "0": {
            "filename": "a.png",
            "caption": "a red circle left of a blue square",
            "negative_caption": "a red circle right of a blue square",
        },
        "1": {
            "filename": "b.png",
            "caption": "a green square above a red circle",
            "negative_caption": "a green square below a red circle",
        },
        "2": {
            "filename": "a.png",
            "caption": "a blue square right of a red circle",
            "negative_caption": "a blue square left of a red circle",
        },
    }
    att = {
        "7": {"filename": "c.png", "caption": "a small blue diamond", "negative_caption": "a large blue diamond"},
        "8": {"filename": "b.png", "caption": "a large green circle", "negative_caption": "a small green circle"},
    }
    (tmp_path / "replace_rel.json").write_text(json.dumps(rel))
    (tmp_path / "swap_att.json").write_text(json.dumps(att))
    return tmp_path


def itm_score(model, tokenizer, image: dict, text: str) -> float:
    """By hand: one forward of one (image, text) pair, the ITM log-odds of "matched"."""
    from finetune.eval_data import collate_samples

    batch = collate_samples([dict(image, caption=text)], tokenizer, 64, "pixels", 64)
    with torch.no_grad():
        tokens, mask = model.embed_visual(batch)
        logits = model.itm_logits(model(batch["input_ids"], batch["text_mask"], tokens, mask))[0]
    return float(logits[1] - logits[0])


def test_sugarcrepe_share_equals_direct_scoring(sugarcrepe, model, tokenizer):
    paths, triples = relation.load_sugarcrepe(
        [sugarcrepe / "replace_rel.json", sugarcrepe / "swap_att.json"], sugarcrepe / "images"
    )
    assert [p.name for p in paths] == ["a.png", "b.png", "c.png"]
    assert [(t.image, t.kind) for t in triples] == [
        (0, "replace_rel"),
        (1, "replace_rel"),
        (0, "replace_rel"),
        (2, "swap_att"),
        (1, "swap_att"),
    ]
    images = relation.load_images(paths, 64)
    got = relation.relation_sensitivity(model, images, triples, tokenizer, **KW)
    assert got["pair_forwards"] == 10
    wins = {"replace_rel": [], "swap_att": []}
    for t in triples:
        wins[t.kind].append(
            itm_score(model, tokenizer, images[t.image], t.caption)
            > itm_score(model, tokenizer, images[t.image], t.negative)
        )
    for kind, hits in wins.items():
        assert got["itm"][kind] == {"accuracy": sum(hits) / len(hits), "count": len(hits)}
    assert got["itm"]["all"]["accuracy"] == pytest.approx(sum(sum(h) for h in wins.values()) / 5)
    assert set(got["embedding"]) == {"replace_rel", "swap_att", "all"}


def test_pairs_file_naming_a_missing_image(sugarcrepe):
    (sugarcrepe / "images" / "b.png").unlink()
    with pytest.raises(UserError, match="b.png") as err:
        relation.load_sugarcrepe([sugarcrepe / "replace_rel.json"], sugarcrepe / "images")
    assert err.value.exit_code == ExitCode.DATA
    with pytest.raises(UserError) as err:
        relation.load_sugarcrepe([sugarcrepe / "absent.json"], sugarcrepe / "images")
    assert err.value.exit_code == ExitCode.USAGE
    (sugarcrepe / "bad.json").write_text(json.dumps({"0": {"filename": "a.png", "caption": "x"}}))
    with pytest.raises(UserError, match="negative_caption") as err:
        relation.load_sugarcrepe([sugarcrepe / "bad.json"], sugarcrepe / "images")
    assert err.value.exit_code == ExitCode.DATA


def test_dataset_negatives_feed_relation_sensitivity(eval_set, model, tokenizer):
    assert len(eval_set.triples) == len(eval_set.captions)  # the synthetic scenes: one negative per caption
    got = relation.relation_sensitivity(model, eval_set.images, eval_set.triples, tokenizer, **KW)
    assert got["itm"]["all"]["count"] == len(eval_set.triples)
    hits = [
        itm_score(model, tokenizer, eval_set.images[t.image], t.caption)
        > itm_score(model, tokenizer, eval_set.images[t.image], t.negative)
        for t in eval_set.triples
    ]
    assert got["itm"]["all"]["accuracy"] == sum(hits) / len(hits)
