"""The host-sync budget of a training micro-batch: at most one operation that would make the host wait
for the GPU (the finite check's read), counted on the CPU by `pretrain.sync_check`, for the objectives
of configs/tiny.yaml (ITC + ITM + MLM + IAIS) in every architecture; and the counter itself against
operations whose effect is known."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.collate import collate, load_tokenizer
from data_tools.synthetic import GRAMMAR_WORDS
from data_tools.wordpiece import write_vocab_tokenizer
from pretrain.config import config_from_dict
from pretrain.config_schema import apply_override, read_yaml
from pretrain.engine import TrainModule, to_engine
from pretrain.objectives import Progress
from pretrain.sync_check import HostSyncCounter
from pretrain.task import PretrainTask
from pretrain.train import micro_step
from pretrain.transfer import DeviceFeeder
from tests.pretrain.test_position_term import objective_and_model, scenes  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
ARCHITECTURE_OVERRIDES = {
    "single_stream": (),
    "two_stream": ("model.preset=tiny_two_stream",),
    # No joint pass: ITC is the dual encoder's only objective and IAIS is undefined.
    "dual_encoder": (
        "model.preset=tiny_dual_encoder",
        "objectives.itm=false",
        "objectives.mlm=false",
        "iais.enabled=false",
    ),
}
CAPTIONS = [
    "a red circle is left of a blue square",
    "there is a green triangle",
    "a small blue circle",
    "the square is above the circle",
    "a large red square is right of a small green triangle",
]


def tiny_config(architecture: str, data: Path):
    tree = read_yaml(REPO / "configs" / "tiny.yaml")
    for override in (f"data.paths=[{data}]", "metrics.enabled=false", *ARCHITECTURE_OVERRIDES[architecture]):
        apply_override(tree, override)
    return config_from_dict(tree)


def loader_batch(
    tokenizer, samples: int = 6, padding_slots: int = 1, max_text_len: int = 32, captions: list[str] = CAPTIONS
) -> dict:
    """A batch as the loader yields it (collate of synthetic samples, uint8 pixels), with padding slots."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(samples - padding_slots):
        rows.append(
            {
                "caption": captions[i % len(captions)],
                "key": f"k{i}",
                "repeat": 0,
                "image_id": f"img{i // 2}",
                "caption_index": i % 2,
                "pixels": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                "boxes": None,
                "phrases": None,
                "negative": "",
            }
        )
    return collate(
        rows + [None] * padding_slots,
        tokenizer=tokenizer,
        max_text_len=max_text_len,
        mlm_probability=0.3,
        seed=0,
        epoch=0,
        image_size=64,
        defer_normalise=True,
    )


class PlainEngine:
    """What `micro_step` needs of a DeepSpeed engine, without DeepSpeed: forward, backward, a clipped
    AdamW step. The step stands for DeepSpeed's, which is not our code: it is not counted."""

    def __init__(self, model: torch.nn.Module, objective):
        self.module = TrainModule(model, objective)
        self.device = torch.device("cpu")
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-3)
        self.counter: HostSyncCounter | None = None

    def __call__(self, batch, progress):
        return self.module(batch, progress)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        with self.counter.paused() if self.counter is not None else contextlib.nullcontext():
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_vocab_tokenizer(GRAMMAR_WORDS, tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("architecture", list(ARCHITECTURE_OVERRIDES))
def test_a_training_micro_batch_has_at_most_one_host_sync(architecture: str, tokenizer, dataset: Path) -> None:
    cfg = tiny_config(architecture, dataset)
    task = PretrainTask(cfg, categories=[])
    torch.manual_seed(0)
    model = task.build_model(tokenizer, fresh=True, say=lambda text: None)
    engine = PlainEngine(model, task.objective())
    for step in range(2):  # the second step runs with the optimizer state in place
        batch = to_engine(loader_batch(tokenizer), engine)
        with HostSyncCounter() as syncs:
            engine.counter = syncs
            finite, logs = micro_step(engine, batch, Progress(step, 10))
        assert finite and logs
        assert syncs.count <= 1, f"{architecture}: {syncs.count} host syncs in one micro-batch:\n{syncs.report()}"


def test_the_counter_sees_reads_data_dependent_shapes_and_host_built_tensors() -> None:
    device_tensor = torch.randn(4, 3)  # made before counting: a step input (on the device)
    with HostSyncCounter() as syncs:
        mask = device_tensor[:, 0] > 0
        float(device_tensor.sum())  # scalar read
        device_tensor[mask]  # boolean index
        mask.nonzero()  # nonzero
        torch.multinomial(device_tensor.abs(), 1)  # multinomial
        device_tensor.tolist()  # host read
        device_tensor + torch.tensor([1.0, 2.0, 3.0])  # host-built, then used with device tensors
        torch.ones(4).to(device_tensor.device)  # a host factory copied
        # Free on a GPU: device-side draws and indices, host reads of host tensors, 0-dim host scalars.
        device_tensor.index_select(0, torch.arange(2, device=device_tensor.device))
        torch.empty(4, 3, device=device_tensor.device).exponential_().argmax(dim=1)
        host = torch.tensor([True, False])
        host.nonzero(), int(host.sum())
        device_tensor * torch.tensor(2.0)
        device_tensor + torch.ones(3).to(device_tensor.device, non_blocking=True)  # queued (pinned on a GPU)
    kinds = [event.kind for event in syncs.events]
    assert kinds == [
        "scalar read",
        "boolean index",
        "nonzero",
        "multinomial",
        "host read",
        "host-to-device copy",
        "host-to-device copy",
    ], syncs.report()
    assert all(event.where.startswith("tests/pretrain/test_host_syncs.py:") for event in syncs.events), syncs.report()


@pytest.mark.parametrize("step", [0, 2, 4], ids=["single-shape", "position-alone", "every-term"])
def test_the_relation_curriculum_and_the_terms_after_it_have_no_host_sync(scenes, step: int) -> None:
    """configs/tiny_relations.yaml's objective at each phase: the position pairs are drawn from the
    boxes the loader made (`batch["host"]`), the captions reach the device asynchronously."""
    loader, batch = scenes
    objective, model, _ = objective_and_model(loader, single_steps=1, hold_steps=3, advance_below=0.1)
    moved = DeviceFeeder(torch.device("cpu"))(dict(batch), torch.float32)
    # On a GPU `host` holds other tensors than the moved batch; on the CPU the same ones: copy them here.
    moved["host"] = {k: [x.clone() for x in v] if isinstance(v, list) else v.clone() for k, v in moved["host"].items()}
    with HostSyncCounter() as syncs:
        syncs.mark(moved["host"], host=True)  # the loader's tensors: on the host in a GPU run too
        out = objective(model, moved, Progress(step, 10))
        out.total.backward()
    expected = {"loss/position"} if step < 3 else {"loss/position", "loss/itc", "loss/itm", "loss/iais"}
    assert expected <= set(out.logs)
    assert syncs.count == 0, f"{syncs.count} host syncs:\n{syncs.report()}"
