"""The batch contract between the loader (`data_tools.loader`) and the model/objectives (`pretrain`).

A batch is a plain dict. Tensors are batch-first; B is the per-rank batch size (padding slots
included), Lt the padded text length (`[CLS] words [SEP] pad...`), M the padded visual token count.
Keys present in every batch:

- `input_ids`      long  [B, Lt]  `[CLS] w1..wn [SEP] pad`; words are positions 1..n.
- `text_mask`      bool  [B, Lt]  real tokens, [CLS] and [SEP] included.
- `word_mask`      bool  [B, Lt]  real words only (no [CLS], [SEP], padding): the rows of S_LL.
- `mlm_input_ids`  long  [B, Lt]  `input_ids` with 15% of words masked (80% [MASK], 10% random, 10% kept),
                                   drawn from the sample's (seed, epoch, key) generator.
- `mlm_labels`     long  [B, Lt]  original ids at masked positions, -100 elsewhere.
- `sample_mask`    bool  [B]      False for padding slots (equal batch counts per rank): zero loss weight.
- `image_id`       list[str]      same for every caption of one image (false-negative masking, grouping).
- `key`            list[str]      sample keys ("" for padding slots).
- `caption_index`  long  [B]      which of the image's captions was chosen.

What the training step would otherwise compute from device tensors, with a host read, or build on the
host in the middle of the step (a GPU would wait for either); here they travel with the batch:
- `image_code`     long  [B]      `image_id_codes(image_id)`: equal for captions of one image, -1 for padding.
- `sample_rows`    long  [P]      indices of the real samples (`sample_mask.nonzero()`): the matched pairs
                                   whose IAIS attention blocks are computed.
- `mlm_positions`  long  [N]      flat indices into [B * Lt] of the MLM targets (`mlm_labels != -100`).
- `text_unpadded`  bool           (a Python bool) every `text_mask` entry is True: attention over the text
                                   needs no mask.

Visual input, one of:
- `pixel_values`   float [B, 3, H, W]  normalised image (ImageNet mean and std): what the patch and grid
                                       embedders read.
  `pixel_uint8`    uint8 [B, H, W, 3]  the same image before normalisation, channels last: what the
                                       loader (`data_tools.loader.Loader`) yields instead of
                                       `pixel_values`, so that a quarter of the bytes cross processes
                                       and go to the device and no float work happens on the host.
                                       `pretrain.engine.to_engine` turns it into `pixel_values` on the
                                       training device; `data_tools.transforms.normalise_batch` does it
                                       anywhere else. A batch carries one of the two, never both.
  `pixel_lease`    uint8 [1], shared  only in batches from loader worker processes: the worker reuses
                                       the pixels' buffer once it reads 0 here, which only
                                       `data_tools.pixel_pool.release_pixels(batch)` writes (to_engine
                                       calls it after moving the pixels); never released, never reused.
- `visual_feats`   float [B, M, D], `visual_pos` float [B, M, 7], `visual_mask` bool [B, M]
                                       precomputed features (the `features` embedder).

Present where the samples carry them (lists are per sample, padding slots hold empty entries):
- `boxes`          list[FloatTensor [k, 4]]  x1, y1, x2, y2 in pixels of `pixel_values` (after the crop).
- `box_categories` list[LongTensor [k]]  each kept box's class index in the datasets' `box_labels`
                                          vocabulary (dataset.json), -1 where unlabelled; always present.
- `tag_ids`, `tag_mask`, `tag_mlm_ids`, `tag_mlm_labels`  [B, Lg]  with `data.max_tag_len` > 0 only: the
                                          sample's object tags (kept boxes' labels) as `[CLS] tags [SEP] pad`,
                                          masked like the words (Oscar; `objectives.tags` appends them).
- `phrase_tokens`  list[list[list[int]]]  per sample, per phrase of the chosen caption: token positions
                                          in `input_ids` (ISDa's T_p).
- `phrase_boxes`   list[list[list[int]]]  per sample, per phrase: indices into that sample's `boxes`
                                          (phrases whose boxes all left the crop are dropped).
- `neg_input_ids`  long [B, Lt], `neg_text_mask` bool [B, Lt], `neg_word_mask` bool [B, Lt],
  `has_negative`   bool [B]               the hard negative caption of the chosen caption, if any.
- `negative_kind`  list[str]              its kind as the json records it ("relation", "attribute"; ""
                                          when the negative has no kind or there is no negative).
- `image_hw`       long [B, 2]            height, width in pixels of the image `boxes` refer to. Pixel
                                          batches: always, [S, S] (the transformed `pixel_values` size).
                                          Feature batches: the stored image's json `height`, `width`,
                                          when every real sample has them ([0, 0] in padding slots); the
                                          `features` embedder scales its normalised region geometry by it.
- `host`           dict                   set by `pretrain.transfer.DeviceFeeder` on the moved batch: the
                                          loader's own `sample_mask`, `boxes` and `box_categories` (those
                                          present), still on the host, for code that reads them as Python
                                          values (the relation curriculum's pairs): on the device every such
                                          read is a synchronisation. `host_view(batch)` returns them.
- `cursor`         dict                   the loader state after this batch (see `data_tools.loader`).
- `bad_samples`    dict[str, int]         bad samples by reason found so far on this rank (cumulative;
                                          set by `data_tools.loader.Loader`, like `cursor`).
"""

from __future__ import annotations

import hashlib

import torch

TEXT_KEYS = ("input_ids", "text_mask", "word_mask", "mlm_input_ids", "mlm_labels")
NEGATIVE_KEYS = ("neg_input_ids", "neg_text_mask", "neg_word_mask", "has_negative")
STEP_KEYS = ("image_code", "sample_rows", "mlm_positions", "text_unpadded")
IGNORE_INDEX = -100
HOST_KEYS = ("sample_mask", "boxes", "box_categories")
"""What `pretrain.transfer.DeviceFeeder` keeps on the host beside the moved batch (`host`)."""


def host_view(batch: dict) -> dict:
    """`batch["host"]` where the batch was moved to a device (the host copies of HOST_KEYS), else the
    batch itself: the values to read as Python numbers without a device synchronisation."""
    return batch.get("host", batch)


def image_id_codes(image_ids: list[str]) -> torch.Tensor:
    """[B] int64 codes of the image ids (stable across processes; "" for padding slots -> -1)."""
    codes = [
        int.from_bytes(hashlib.blake2b(s.encode(), digest_size=7).digest(), "little") if s else -1 for s in image_ids
    ]
    return torch.tensor(codes, dtype=torch.long)


def step_keys(batch: dict) -> dict:
    """The `STEP_KEYS` of a batch that has `image_id`, `sample_mask`, `text_mask` and `mlm_labels`,
    computed on the host (where the batch is built)."""
    labels = batch["mlm_labels"]
    return {
        "image_code": image_id_codes(batch["image_id"]),
        "sample_rows": batch["sample_mask"].nonzero().flatten(),
        "mlm_positions": ((labels != IGNORE_INDEX) & batch["sample_mask"][:, None]).flatten().nonzero().flatten(),
        "text_unpadded": bool(batch["text_mask"].all()),
    }
