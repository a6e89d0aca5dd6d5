"""Evaluation cost: ITM pair forwards and wall time of `full` against `rerank` (k = 8, 16, 32) and
`embedding` on a synthetic gallery of at least 1,000 captions, with R@1 of each.

    python bench/bench_eval.py --data DATASET [--weights RUN_OR_EXPORT] [--images N] [--ks 8 16 32]

Prints one JSON object per measurement as it finishes (the cheap modes first, the `full` baseline
last, measured in the same run), then one comparison object per mode against that baseline
(forwards and time as a share of full, R@1 difference in points). On synthetic scenes R@1 is also
given counting any caption true of the image (`*_any_true`; finetune.eval_data.caption_truth).
Without --weights the tiny preset is randomly initialised (recalls then near chance): say so when quoting the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from data_tools.collate import load_tokenizer
    from finetune import recall, scoring
    from finetune.eval_data import read_eval_set
    from finetune.evaluate import load_for_evaluation
    from pretrain.model import ModelConfig, RelAlignModel

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", default=None, help="run directory, checkpoint or export (default: untrained tiny)")
    parser.add_argument("--images", type=int, default=400, help="gallery images (synthetic scenes: 2-3 captions each)")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    if args.weights:
        loaded = load_for_evaluation(args.weights)
        model, tokenizer, trained = loaded.model, loaded.tokenizer, loaded.source
    else:
        tokenizer = None
        trained = "untrained (random init, tiny preset)"
    tokenizer = tokenizer or load_tokenizer(Path(args.data) / "tokenizer")
    if not args.weights:
        torch.manual_seed(0)
        model = RelAlignModel(ModelConfig.preset("tiny", vocab_size=len(tokenizer))).eval()
    model.eval()
    eval_set = read_eval_set(args.data, image_size=model.config.image_size, limit=args.images)
    images, captions = len(eval_set.images), len(eval_set.captions)
    common = {
        "bench": "eval",
        "images": images,
        "captions": captions,
        "model": trained,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
    }
    results = {}
    for mode, k in [("embedding", None)] + [("rerank", k) for k in args.ks] + [("full", None)]:
        start = time.perf_counter()
        scores = scoring.score_gallery(
            model,
            eval_set,
            tokenizer,
            mode=mode,
            k=k or 16,
            batch_size=args.batch_size,
            max_text_len=model.config.max_text_len,
            visual="pixels",
            image_size=model.config.image_size,
        )
        wall = time.perf_counter() - start
        r = recall.recall(scores.scores_i2t, eval_set.caption_image, scores.scores_t2i)
        name = mode if k is None else f"rerank@{k}"
        results[name] = {
            "mode": mode,
            "k": k,
            "pair_forwards": scores.pair_forwards,
            "wall_s": round(wall, 3),
            "pair_s": round(scores.pair_seconds, 3),
            "i2t@1": r["i2t@1"],
            "t2i@1": r["t2i@1"],
            "rsum": round(r["rsum"], 2),
        }
        if eval_set.caption_truth is not None:  # synthetic scenes: any caption true of the image counts too
            t = recall.recall_any_true(scores.scores_i2t, eval_set.caption_truth, scores.scores_t2i)
            results[name].update({"i2t@1_any_true": t["i2t@1"], "t2i@1_any_true": t["t2i@1"]})
        print(json.dumps({**common, "measure": name, **results[name]}), flush=True)
    base = results["full"]
    for name, value in results.items():
        if name == "full":
            continue
        print(
            json.dumps(
                {
                    **common,
                    "measure": f"{name}_vs_full",
                    "forwards_share": value["pair_forwards"] / base["pair_forwards"],
                    "time_share": value["wall_s"] / base["wall_s"],
                    "i2t@1_diff_points": 100 * (value["i2t@1"] - base["i2t@1"]),
                    "t2i@1_diff_points": 100 * (value["t2i@1"] - base["t2i@1"]),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
