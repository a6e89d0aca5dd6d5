"""Gallery scoring: rerank with k = gallery size equals full, a pair's score does not depend on its
batch, and scoring split over 2 processes (gloo) equals one process bit for bit."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from finetune import recall, scoring

KW = dict(max_text_len=64, visual="pixels", image_size=64, batch_size=32)


def test_rerank_with_k_equal_to_gallery_is_full(model, eval_set, tokenizer):
    full = scoring.score_gallery(model, eval_set, tokenizer, mode="full", **KW)
    images, captions = full.scores_i2t.shape
    assert full.pair_forwards == images * captions
    everything = scoring.score_gallery(model, eval_set, tokenizer, mode="rerank", k=max(images, captions), **KW)
    assert torch.equal(recall.positions(everything.scores_i2t), recall.positions(full.scores_i2t))
    assert torch.equal(recall.positions(everything.scores_t2i.T), recall.positions(full.scores_t2i.T))
    assert recall.recall(everything.scores_i2t, eval_set.caption_image, everything.scores_t2i) == recall.recall(
        full.scores_i2t, eval_set.caption_image
    )
    few = scoring.score_gallery(model, eval_set, tokenizer, mode="rerank", k=3, **KW)
    assert few.pair_forwards < images * captions
    # Candidates rank first, in ITM order: each image's top row is its best ITM score among its 3 candidates.
    candidates = scoring.top_candidates(few.embedding, 3)  # [I, 3]
    best = candidates.gather(1, full.scores_i2t.gather(1, candidates).argmax(dim=1, keepdim=True)).squeeze(1)
    assert torch.equal(few.scores_i2t.argmax(dim=1), best)
    # The rest follow in embedding order.
    tail = recall.positions(few.scores_i2t)[0]
    rest = [
        c
        for c in torch.sort(few.embedding[0], descending=True, stable=True).indices.tolist()
        if c not in candidates[0].tolist()
    ]
    assert [int(tail[c]) for c in rest] == list(range(3, captions))


def test_embedding_mode_is_the_cosine_matrix(model, eval_set, tokenizer):
    result = scoring.score_gallery(model, eval_set, tokenizer, mode="embedding", **KW)
    assert result.pair_forwards == 0
    assert torch.equal(result.scores_i2t, result.embedding)
    assert result.embedding.abs().max() <= 1.0 + 1e-5


def test_pair_score_does_not_depend_on_its_batch(model, eval_set, tokenizer):
    vis = scoring.embed_images(model, eval_set.images, tokenizer, visual="pixels", image_size=64, batch_size=8)
    texts = scoring.tokenize(eval_set.captions, tokenizer, 64)
    scorer = scoring.PairScorer(model, vis, texts, batch_size=8)
    images, captions = torch.tensor([0, 3, 5, 1, 2]), torch.tensor([4, 4, 0, 7, 9])
    together = scorer(images, captions)
    alone = torch.cat([scorer(images[i : i + 1], captions[i : i + 1]) for i in range(5)])
    # No padding difference: equal up to the rounding of a row's position in the batch (a few ulps).
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    assert scorer.pair_forwards == 10
    with torch.no_grad():  # and equals a direct forward of the model
        out = model(texts.input_ids[[4]], texts.text_mask[[4]], vis.tokens[[0]], vis.mask[[0]])
        logits = model.itm_logits(out)[0]
    assert together[0] == pytest.approx(float(logits[1] - logits[0]), abs=1e-5)


def _worker(rank: int, world: int, port: int, synthetic: str, out: str) -> None:
    import torch.distributed as dist

    from data_tools.collate import load_tokenizer
    from finetune.eval_data import read_eval_set
    from tests.finetune.conftest import tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tokenizer = load_tokenizer(f"{synthetic}/tokenizer")
        model = tiny_model(len(tokenizer))
        eval_set = read_eval_set(synthetic, image_size=64)
        full = scoring.score_gallery(model, eval_set, tokenizer, mode="full", **KW)
        rerank = scoring.score_gallery(model, eval_set, tokenizer, mode="rerank", k=4, **KW)
        if rank == 0:
            torch.save(
                {
                    "full": full.scores_i2t,
                    "rerank_i2t": rerank.scores_i2t,
                    "rerank_t2i": rerank.scores_t2i,
                    "forwards": full.pair_forwards,
                },
                out,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_processes_equal_one(synthetic, tokenizer, eval_set, tmp_path, port):
    from tests.finetune.conftest import tiny_model

    out = tmp_path / "scores.pt"
    context = mp.spawn(_worker, args=(2, port, str(synthetic), str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("2-process scoring did not finish within 240 s")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model(len(tokenizer))
        full = scoring.score_gallery(model, eval_set, tokenizer, mode="full", **KW)
        rerank = scoring.score_gallery(model, eval_set, tokenizer, mode="rerank", k=4, **KW)
    finally:
        torch.set_num_threads(threads)
    got = torch.load(out, weights_only=True)
    assert got["forwards"] == full.pair_forwards
    assert torch.equal(got["full"], full.scores_i2t)
    assert torch.equal(got["rerank_i2t"], rerank.scores_i2t)
    assert torch.equal(got["rerank_t2i"], rerank.scores_t2i)
