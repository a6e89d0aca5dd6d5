"""Relation sensitivity: for every (image, true caption, negative caption) triple, does the model
score the true caption higher? Reported as a share per kind, by ITM score and by embedding cosine.

Sources of triples:
- a dataset's samples (`negatives` in their json, read by `eval_data.read_eval_set`);
- files in SugarCrepe's published format: one JSON per kind, the file stem is the kind (e.g.
  `replace_rel.json` -> "replace_rel"), `{id: {"filename": ..., "caption": ..., "negative_caption": ...}}`,
  with the images by file name from one folder (`--pairs FILE... --images DIR`).

"Higher" is strict: a tie (e.g. a model whose ITM output does not depend on the text) counts as a
miss, so chance for a constant model is 0, and for a random one 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data_tools.errors import BadSample, ExitCode, UserError
from data_tools.images import DEFAULT_MAX_PIXELS, decode_pixels

from .eval_data import Triple, transform_image
from .scoring import PairScorer, embed_images, image_embeddings, text_embeddings, tokenize

SUGARCREPE_FIELDS = ("filename", "caption", "negative_caption")


def load_sugarcrepe(files: list[str | Path], images_dir: str | Path) -> tuple[list[Path], list[Triple]]:
    """Triples of SugarCrepe-format files -> (image paths in first-use order, triples indexing them).

    Checked before anything is scored: a missing file or folder is a usage error (exit 2); a file
    that is not the format, or an entry naming an image the folder lacks, a data error (exit 3).
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise UserError(f"--images {folder}: not a folder (the images the pairs files name by file name)")
    images: dict[Path, int] = {}
    triples: list[Triple] = []
    for file in map(Path, files):
        if not file.is_file():
            raise UserError(f"--pairs {file}: no such file")
        try:
            entries = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{file}: not JSON ({err})".splitlines()[0], ExitCode.DATA) from None
        if not isinstance(entries, dict):
            raise UserError(
                f"{file}: expected {{id: {{filename, caption, negative_caption}}}}, got a {type(entries).__name__}",
                ExitCode.DATA,
            )
        for key, entry in entries.items():
            if not isinstance(entry, dict) or not all(
                isinstance(entry.get(f), str) and entry.get(f) for f in SUGARCREPE_FIELDS
            ):
                raise UserError(
                    f"{file}: entry {key!r} needs non-empty string fields {', '.join(SUGARCREPE_FIELDS)}", ExitCode.DATA
                )
            path = folder / entry["filename"]
            if not path.is_file():
                raise UserError(
                    f"{file}: entry {key!r} names image {entry['filename']!r}, not found in {folder}", ExitCode.DATA
                )
            index = images.setdefault(path, len(images))
            triples.append(Triple(index, entry["caption"], entry["negative_caption"], file.stem))
    return list(images), triples


def load_images(paths: list[Path], image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
    """Image files -> eval-transformed collate samples (pixels only; an unreadable image is exit 3)."""
    samples = []
    for path in paths:
        try:
            image = decode_pixels(path.read_bytes(), max_pixels)
        except BadSample as err:
            raise UserError(f"{path}: unusable image ({err})", ExitCode.DATA) from None
        decoded = {
            "key": path.name,
            "image_id": path.name,
            "repeat": 0,
            "image": image,
            "caption": "",
            "caption_index": 0,
            "boxes": None,
            "phrases": None,
            "negative": None,
            "feats": None,
            "pos": None,
            "image_hw": None,
        }
        samples.append(transform_image(decoded, image_size)[0])
    return samples


def shares(true_scores: Tensor, negative_scores: Tensor, kinds: list[str]) -> dict[str, dict[str, float]]:
    """{kind: {"accuracy": share with true > negative, "count": n}} plus "all" over every triple."""
    correct = (true_scores > negative_scores).tolist()
    out: dict[str, dict[str, float]] = {}
    for kind in sorted(set(kinds)) + ["all"]:
        hits = [c for c, k in zip(correct, kinds) if kind in ("all", k)]
        out[kind] = {"accuracy": sum(hits) / len(hits) if hits else 0.0, "count": len(hits)}
    return out


@torch.no_grad()
def relation_sensitivity(
    model,
    images: list[dict[str, Any]],
    triples: list[Triple],
    tokenizer,
    *,
    max_text_len: int,
    visual: str,
    image_size: int,
    batch_size: int = 128,
    score: str = "logit",
    itm: bool = True,
) -> dict[str, Any]:
    """Shares per kind by ITM score and by embedding cosine, plus the triples' pair-forward count.

    `itm=False` (a dual encoder: no ITM) scores by embedding only; "itm" is then empty.

    Returns {"itm": {kind: {"accuracy", "count"}}, "embedding": {...}, "pair_forwards": n, "seconds": s}.
    """
    if not triples:
        return {"itm": {}, "embedding": {}, "pair_forwards": 0, "seconds": 0.0}
    used = sorted({t.image for t in triples})
    position = {image: n for n, image in enumerate(used)}
    vis = embed_images(
        model, [images[i] for i in used], tokenizer, visual=visual, image_size=image_size, batch_size=batch_size
    )
    texts = tokenize([text for t in triples for text in (t.caption, t.negative)], tokenizer, max_text_len)
    image_index = torch.tensor([position[t.image] for t in triples])  # [T]
    scorer = PairScorer(model, vis, texts, batch_size=batch_size, score=score)
    pair_scores = (
        scorer(image_index.repeat_interleave(2), torch.arange(2 * len(triples))).view(-1, 2) if itm else None
    )  # [T, 2]
    image_emb = image_embeddings(model, vis, batch_size).cpu()[image_index]  # [T, E]
    text_emb = text_embeddings(model, texts, batch_size).cpu().view(len(triples), 2, -1)  # [T, 2, E]
    cosine = (text_emb * image_emb[:, None, :]).sum(dim=-1)  # [T, 2]
    kinds = [t.kind for t in triples]
    itm_shares = shares(pair_scores[:, 0], pair_scores[:, 1], kinds) if pair_scores is not None else {}
    return {
        "itm": itm_shares,
        "embedding": shares(cosine[:, 0], cosine[:, 1], kinds),
        "pair_forwards": scorer.pair_forwards,
        "seconds": scorer.seconds,
    }
