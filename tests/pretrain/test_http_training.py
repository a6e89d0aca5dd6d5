"""Two real trainer ranks on a dataset whose shards are http:// URLs (a loopback server that drops
one connection mid-shard): every sample is trained on exactly once (a sample counted bad would be
missing from the recorded keys) and the drop is resumed with a Range request."""

from __future__ import annotations

import pytest

from data_tools.builders.synthetic import scene_key
from tests.conftest import free_port
from tests.data_tools.test_http_shards import SAMPLES, built, served, shard_path  # noqa: F401 (fixtures)
from tests.pretrain.runs import base_args, logs_text, read_keys, run_ranks

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_two_ranks_train_on_http_shards_exactly_once_through_a_drop(served, tmp_path):
    server, remote = served
    server.drops[shard_path(3)] = 12000
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    args = base_args(
        remote,
        run_dir,
        "data.batch_size=4",
        "train.epochs=1",
        "train.record_keys=true",
        f"data.remote_allow=[{server.url}/]",
    )
    codes = run_ranks(2, args, free_port(), logs)
    assert codes == [0, 0], logs_text(logs)
    keys = [key for _, _, key in read_keys(run_dir)]
    assert sorted(keys) == sorted(scene_key(0, i) for i in range(SAMPLES)), logs_text(logs)
    assert (shard_path(3), "bytes=12000-") in server.requests
