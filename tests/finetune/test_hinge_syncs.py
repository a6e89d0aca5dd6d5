"""The host-sync budget of a finetuning micro-batch with the paper's hard-negative recipe: mining reads
the chosen candidates' ids once (the host fetches their captions or images from the store), the finite
check once; nothing else waits for the device. Counted on the CPU by `pretrain.sync_check` (see
tests/pretrain/test_host_syncs.py), for both batch kinds and both mining modes."""

from __future__ import annotations

import pytest
import torch

from finetune.config import load_finetune_config
from finetune.task import FinetuneTask
from pretrain.engine import to_engine
from pretrain.objectives import Progress
from pretrain.sync_check import HostSyncCounter
from pretrain.train import micro_step
from tests.pretrain.test_host_syncs import REPO, PlainEngine
from tests.pretrain.test_position_term import scenes  # noqa: F401 (fixture)


@pytest.mark.parametrize("mining", ["random_n", "itc_topk"])
def test_a_finetuning_micro_batch_waits_for_the_device_twice_at_most(scenes, mining: str) -> None:  # noqa: F811
    loader, _ = scenes
    overrides = (
        f"data.paths=[{loader.config.paths[0]}]",
        "data.batch_size=8",
        "metrics.enabled=false",
        "objectives.position.enabled=false",
        "finetune.candidates=4",
        "finetune.hard=2",
        f"finetune.mining={mining}",
    )
    task = FinetuneTask(load_finetune_config(REPO / "configs" / "tiny_relations.yaml", overrides))
    train = task.train_loader(8, rank=0, world_size=1)
    torch.manual_seed(0)
    engine = PlainEngine(task.build_model(train.tokenizer, fresh=True, say=lambda text: None), task.objective())
    batches = iter(train)
    for step in range(2):  # an image-anchored batch, then a caption-anchored one (batch_kinds: alternate)
        batch = to_engine(next(batches), engine)
        # On a GPU `host` holds other tensors than the moved batch; on the CPU the same ones: copy them here.
        batch["host"] = {
            k: [x.clone() for x in v] if isinstance(v, list) else v.clone() for k, v in batch["host"].items()
        }
        with HostSyncCounter() as syncs:
            syncs.mark(batch["host"], host=True)  # the loader's own tensors: on the host in a GPU run too
            engine.counter = syncs
            finite, logs = micro_step(engine, batch, Progress(step, 10))
        assert finite and "loss/hinge" in logs
        assert syncs.count <= 2, f"step {step}: {syncs.count} host syncs:\n{syncs.report()}"
