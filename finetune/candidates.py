"""Random access to a dataset's captions and images by manifest row: the candidate pool of hard-negative
mining (DESIGN.md 1, the paper's recipe: N random candidates per matched pair).

    store = CandidateStore(data_cfg, tokenizer)
    store.caption_rows(image_id) / store.num_captions          # the pool: (sample row, caption index) pairs
    text = store.texts([3, 17, ...])                           # {"input_ids", "text_mask"} [n, Lt]
    visual = store.visual_batch([5, 9, ...])                   # a collated batch: pixel_uint8 or feats/pos

Why through the manifest: each sample's members have their byte offset and size in
`manifest.parquet`, so one candidate is a seek and a read in its shard, never a scan (DESIGN.md 3).
Only local shards are supported for mining (remote shards would need a range request per candidate:
refused with one line). Decoded images are kept in a bounded cache (candidates repeat across steps).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import numpy as np
import torch

from data_tools import schema
from data_tools.collate import TextEncoder, collate
from data_tools.decode import decode_sample, parse_meta
from data_tools.errors import BadSample, ExitCode, UserError
from data_tools.manifest import load_dataset_info, load_manifest
from data_tools.shard_reader import is_local
from data_tools.transforms import transform_sample

IMAGE_CACHE = 4096
"""Decoded, transformed candidate images kept in memory (least recently used dropped)."""


class CandidateStore:
    def __init__(self, data: Any, tokenizer: Any):
        self.data = data
        self.encode = TextEncoder(tokenizer, data.max_text_len)
        self.tokenizer = tokenizer
        self._locations: list[list[str]] = []
        dataset_of, shard, members, image_ids, num_captions = [], [], [], [], []
        for d, path in enumerate(data.paths):
            info = load_dataset_info(path)
            locations = info.locations(path, data.trust)  # pipe:/URL only with the user's opt-in (data_tools.trust)
            remote = [loc for loc in locations if not is_local(loc)]
            if remote:
                raise UserError(
                    f"{path}: hard-negative mining reads candidates by offset and needs local shards "
                    f"({remote[0]} is remote); use finetune.mining=itc_topk with a local copy"
                )
            self._locations.append(locations)
            table = load_manifest(path)
            dataset_of += [d] * table.num_rows
            shard += table.column("shard").to_pylist()
            members += table.column("members").to_pylist()
            image_ids += table.column("image_id").to_pylist()
            num_captions += table.column("num_captions").to_pylist()
        self._dataset = np.asarray(dataset_of, dtype=np.int32)
        self._shard = np.asarray(shard, dtype=np.int32)
        self._members = members  # JSON strings, parsed on use
        self.image_ids = image_ids  # [rows]
        counts = np.maximum(np.asarray(num_captions, dtype=np.int64), 1)
        self.caption_row = np.repeat(np.arange(len(image_ids)), counts)  # [captions] -> sample row
        self.caption_index = np.concatenate([np.arange(c) for c in counts]) if len(counts) else np.zeros(0, np.int64)
        codes = {s: i for i, s in enumerate(dict.fromkeys(image_ids))}
        self.row_image = np.asarray([codes[s] for s in image_ids], dtype=np.int64)  # [rows] image code
        self.image_code = codes
        self._texts: dict[int, str] = {}
        self._images: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self._files: dict[tuple[int, int], Any] = {}

    @property
    def num_rows(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.caption_row)

    # --- raw reads -------------------------------------------------------------------------------
    def _read(self, row: int, extensions: tuple[str, ...] | None = None) -> dict[str, Any]:
        d, s = int(self._dataset[row]), int(self._shard[row])
        handle = self._files.get((d, s))
        if handle is None:
            handle = self._files[(d, s)] = open(self._locations[d][s], "rb")
        raw: dict[str, Any] = {"__key__": None}
        for ext, (offset, size) in json.loads(self._members[row]).items():
            if extensions is None or ext in extensions:
                handle.seek(offset)
                raw[ext] = handle.read(size)
        return raw

    def caption(self, caption_id: int) -> str:
        """The text of pool caption `caption_id` (cached)."""
        text = self._texts.get(caption_id)
        if text is None:
            row, index = int(self.caption_row[caption_id]), int(self.caption_index[caption_id])
            raw = self._read(row, (schema.META_EXTENSION, schema.TEXT_EXTENSION))
            raw["__key__"] = str(row)
            try:
                captions = parse_meta(raw).get("captions")
            except BadSample:
                captions = None
            if not captions and schema.TEXT_EXTENSION in raw:
                captions = [raw[schema.TEXT_EXTENSION].decode("utf-8", "replace")]
            text = captions[index] if captions and index < len(captions) else ""
            self._texts[caption_id] = text
        return text

    def texts(self, caption_ids: list[int]) -> dict[str, torch.Tensor]:
        """Tokenised pool captions: input_ids, text_mask [n, Lt]."""
        encoded = self.encode([self.caption(int(c)) for c in caption_ids])
        return {"input_ids": encoded["input_ids"], "text_mask": encoded["text_mask"]}

    def _sample(self, row: int) -> dict[str, Any]:
        cached = self._images.get(row)
        if cached is not None:
            self._images.move_to_end(row)
            return cached
        raw = self._read(row)
        raw["__key__"] = f"candidate-{row}"
        try:
            sample = decode_sample(
                raw, seed=self.data.seed, epoch=0, max_pixels=self.data.max_pixels, visual=self.data.visual
            )
        except BadSample as err:
            raise UserError(f"candidate sample {self.image_ids[row]!r} is unusable ({err})", ExitCode.DATA) from None
        sample = transform_sample(
            sample,
            image_size=self.data.image_size,
            train=False,
            crop_scale=self.data.crop_scale,
            flip=False,
            seed=self.data.seed,
            epoch=0,
        )
        self._images[row] = sample
        if len(self._images) > IMAGE_CACHE:
            self._images.popitem(last=False)
        return sample

    def visual_batch(self, rows: list[int]) -> dict[str, Any]:
        """A collated batch of the pool images `rows` (eval transform): uint8 pixels, normalised where they
        are used (`data_tools.transforms.normalise_batch`, on the device: a quarter of the bytes to copy)."""
        samples = [self._sample(int(r)) for r in rows]
        return collate(
            samples,
            tokenizer=self.encode,
            max_text_len=self.data.max_text_len,
            mlm_probability=0.0,
            seed=self.data.seed,
            epoch=0,
            visual=self.data.visual,
            image_size=self.data.image_size,
            defer_normalise=True,
        )

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def image_code(store: CandidateStore, image_id: str) -> int:
    """The store's code of an image id (-1 when the pool does not hold that image)."""
    return store.image_code.get(image_id, -1)


@dataclasses.dataclass
class CandidateDraw:
    ids: torch.Tensor  # [B, N] pool ids (caption ids or image rows); -1 for padding slots
    valid: torch.Tensor  # [B] bool: the anchor is real and enough candidates exist


def draw_candidates(
    pool_image: np.ndarray, anchor_images: list[int], count: int, generators: list[torch.Generator | None]
) -> CandidateDraw:
    """`count` distinct pool entries per anchor, none of the anchor's own image.

    pool_image [P]: image code of every pool entry; anchor_images[b]: the anchor's image code;
    generators[b]: its seeded generator (None: a padding slot). Rejection sampling over the pool:
    cost O(count) per anchor, independent of the pool size.
    """
    pool = len(pool_image)
    ids = torch.full((len(anchor_images), count), -1, dtype=torch.long)
    valid = torch.zeros(len(anchor_images), dtype=torch.bool)
    for b, (image, gen) in enumerate(zip(anchor_images, generators)):
        if gen is None:
            continue
        allowed = pool - int((pool_image == image).sum())
        if allowed < count:
            continue
        chosen: list[int] = []
        seen: set[int] = set()
        while len(chosen) < count:
            for candidate in torch.randint(pool, (2 * (count - len(chosen)) + 8,), generator=gen).tolist():
                if candidate not in seen and pool_image[candidate] != image:
                    seen.add(candidate)
                    chosen.append(candidate)
                    if len(chosen) == count:
                        break
        ids[b] = torch.tensor(chosen)
        valid[b] = True
    return CandidateDraw(ids, valid)


def hardest(scores: torch.Tensor, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` highest-scoring candidates per row (ties: the earlier candidate): [B, N] -> [B, keep] ids."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]  # [B, H]
    return ids.gather(1, order)
