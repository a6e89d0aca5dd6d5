"""A dataset folder never runs code (DESIGN.md 3, docs/trust.md): a `pipe:` shard location planted in
dataset.json runs in no reader (stats, verify, stream, tokenizer, merge, the loader, evaluation and
mining readers, the trainer's config check) unless the user opts in; each reader stops before
reading with one line naming the dataset, the shard and the command, exit code 3. With the opt-in
the same folder streams exactly what its local copy does. URLs from a dataset.json are fetched only
under a prefix the user allowed; a tokenizer folder's `auto_map` code never runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.builders.synthetic import scene_key
from data_tools.errors import ExitCode, UserError
from data_tools.schema import DATASET_FILE
from tests.data_tools.conftest import build

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
REFUSED = "which a dataset folder cannot run on its own"


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """16 synthetic samples in two shards of 8 (with its tokenizer)."""
    out = tmp_path_factory.mktemp("untrusted") / "local"
    assert build("build", "synthetic", "--samples", "16", "--shard-samples", "8", "--out", str(out)) == 0
    return out


def plant(source: Path, folder: Path, location) -> Path:
    """A copy of `source` whose dataset.json lists shard 0 at `location(path of the copy's shard 0)`."""
    shutil.copytree(source, folder)
    info = json.loads((folder / DATASET_FILE).read_text())
    info["shards"][0]["location"] = location(folder / info["shards"][0]["location"])
    (folder / DATASET_FILE).write_text(json.dumps(info))
    return folder


@pytest.fixture
def piped(local, tmp_path) -> tuple[Path, Path]:
    """(a copy whose shard 0 is `pipe:touch MARK; cat <shard>`, MARK): the command still yields the shard."""
    marker = tmp_path / "MARK"
    return plant(local, tmp_path / "piped", lambda shard: f"pipe:touch {marker}; cat {shard}"), marker


def data_tools(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_tools", *argv], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def assert_refused_line(text: str, folder: Path, opt_in: str) -> None:
    """One line naming the dataset file, the shard, the command, and how to opt in."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    line = lines[0]
    assert f"{folder / DATASET_FILE}: shard 0 is the shell command 'pipe:touch " in line and REFUSED in line, line
    assert opt_in in line, line


@pytest.mark.parametrize(
    "command",
    [
        ["stats"],
        ["stats", "--json"],
        ["stream"],
        ["stream", "--decode"],
        ["tokenizer", "--vocab-size", "40", "--out", "TOKENIZER"],
    ],
)
def test_cli_readers_refuse_a_planted_pipe_before_reading(piped, tmp_path, command):
    folder, marker = piped
    argv = [str(tmp_path / "tok") if a == "TOKENIZER" else a for a in command]
    proc = data_tools(argv[0], str(folder), *argv[1:])
    assert proc.returncode == ExitCode.DATA, proc.stderr
    assert proc.stdout == ""
    assert_refused_line(proc.stderr.removeprefix("data_tools: error: "), folder, "--allow-pipe")
    assert proc.stderr.startswith("data_tools: error: ")
    assert not marker.exists()
    assert not (tmp_path / "tok").exists()


def test_verify_reports_the_pipe_it_may_not_read_and_reads_nothing(piped):
    folder, marker = piped
    proc = data_tools("verify", str(folder))
    assert proc.returncode == ExitCode.DATA, proc.stdout + proc.stderr
    refusal, summary = proc.stdout.strip().splitlines()
    assert_refused_line(refusal, folder, "--allow-pipe")
    assert summary.endswith("1 shard is not allowed to be read, nothing checked") and "OK" not in proc.stdout
    assert not marker.exists()


def test_with_allow_pipe_the_cli_readers_see_what_the_local_copy_holds(local, piped):
    folder, marker = piped
    for command in (["stream", "--decode", "--world-size", "2"], ["stats", "--json"]):
        mine = data_tools(command[0], str(local), *command[1:])
        theirs = data_tools(command[0], str(folder), *command[1:], "--allow-pipe")
        assert mine.returncode == theirs.returncode == 0, theirs.stderr
        assert theirs.stdout.replace(str(folder), str(local)) == mine.stdout
    proc = data_tools("verify", str(folder), "--allow-pipe")
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), proc.stdout + proc.stderr
    assert marker.exists()


def config(path: Path, **kw):
    from data_tools.loader import DataConfig

    return DataConfig(
        **{"paths": [str(path)], "batch_size": 4, "shuffle_block": 3, "image_size": 32, "max_text_len": 16, **kw}
    )


def test_the_loader_refuses_without_the_opt_in_and_streams_the_same_bytes_with_it(local, piped):
    import torch

    from data_tools.loader import Loader

    folder, marker = piped
    with pytest.raises(UserError) as refused:
        Loader(config(folder))
    assert refused.value.exit_code == ExitCode.DATA
    assert_refused_line(str(refused.value), folder, f"data.allow_pipe_from=[{folder}]")
    assert not marker.exists()
    mine = list(Loader(config(local)))
    theirs = list(Loader(config(folder, allow_pipe_from=[str(folder)])))
    assert marker.exists()
    assert [b["key"] for b in theirs] == [b["key"] for b in mine] and len(mine) == 4
    assert all(
        torch.equal(a["pixel_uint8"], b["pixel_uint8"]) and torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(mine, theirs)
    )


def test_an_opt_in_for_another_folder_does_not_cover_this_one(local, piped, tmp_path):
    from data_tools.loader import Loader
    from data_tools.shard_reader import read_sample

    folder, marker = piped
    with pytest.raises(UserError):
        Loader(config(folder, allow_pipe_from=[str(local)]))
    with pytest.raises(UserError) as refused:
        read_sample(folder, scene_key(0, 1))
    assert refused.value.exit_code == ExitCode.DATA and REFUSED in str(refused.value)
    assert not marker.exists()


def test_evaluation_and_mining_readers_refuse_before_reading(piped):
    from data_tools.collate import load_tokenizer
    from finetune.candidates import CandidateStore
    from finetune.eval_data import read_eval_set

    folder, marker = piped
    with pytest.raises(UserError) as refused:
        read_eval_set(folder, image_size=32)
    assert refused.value.exit_code == ExitCode.DATA and REFUSED in str(refused.value)
    with pytest.raises(UserError) as refused:
        CandidateStore(config(folder), load_tokenizer(folder / "tokenizer"))
    assert refused.value.exit_code == ExitCode.DATA and REFUSED in str(refused.value)
    assert not marker.exists()


def test_evaluation_with_the_opt_in_reads_what_the_local_copy_holds(local, piped):
    from data_tools.trust import Trust
    from finetune.eval_data import read_eval_set

    folder, marker = piped
    mine = read_eval_set(local, image_size=32)
    theirs = read_eval_set(folder, image_size=32, trust=Trust(pipe_folders=(str(folder),)))
    assert marker.exists()
    assert theirs.captions == mine.captions and len(theirs.images) == len(mine.images) == 16
    for a, b in zip(mine.images, theirs.images):
        assert a.keys() == b.keys()
        assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a if a[k] is not None), a["key"]


def test_finetune_evaluate_refuses_before_loading_any_weights(piped, tmp_path):
    folder, marker = piped
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune",
            "evaluate",
            str(tmp_path / "no-weights"),
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "report"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == ExitCode.DATA, proc.stderr
    assert_refused_line(proc.stderr.split(": error: ", 1)[1], folder, "--allow-pipe")
    assert not marker.exists() and not (tmp_path / "report").exists()


def test_training_refuses_at_the_config_check(piped, tmp_path):
    folder, marker = piped
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            f"data.paths=[{folder}]",
            f"run.dir={tmp_path / 'run'}",
            "metrics.enabled=false",
            "train.steps=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == ExitCode.DATA, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("pretrain: error: data.paths[0]: "), line
    assert_refused_line(line.split("data.paths[0]: ", 1)[1], folder, f"data.allow_pipe_from=[{folder}]")
    assert not marker.exists()


def test_merge_refuses_a_build_state_that_names_a_command(tmp_path):
    out, marker = tmp_path / "parts", tmp_path / "MARK"
    for part in ("0", "1"):
        assert (
            build(
                "build",
                "synthetic",
                "--samples",
                "8",
                "--shard-samples",
                "4",
                "--num-parts",
                "2",
                "--part",
                part,
                "--out",
                str(out),
            )
            == 0
        )
    state = sorted((out / ".build").glob("shard-*.json"))[0]
    data = json.loads(state.read_text())
    data["location"] = f"pipe:touch {marker}; cat {out / data['location']}"
    state.write_text(json.dumps(data))
    proc = data_tools("merge", str(out))
    assert proc.returncode == ExitCode.DATA, proc.stderr
    assert "a build writes file paths only" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (out / DATASET_FILE).exists() and not marker.exists()


# --- URLs ----------------------------------------------------------------------------------------
@pytest.fixture
def remote(local, tmp_path) -> Path:
    """A copy whose shard 0 is an http URL on a port nothing listens on (nothing may try it anyway)."""
    return plant(local, tmp_path / "remote", lambda shard: f"http://127.0.0.1:9/data/{shard.name}")


def test_urls_from_a_dataset_json_need_an_allowed_prefix(remote):
    from data_tools.shard_reader import open_datasets
    from data_tools.trust import Allowed, Trust

    with pytest.raises(UserError) as refused:
        open_datasets([str(remote)])
    message = str(refused.value)
    assert refused.value.exit_code == ExitCode.DATA
    assert f"{remote / DATASET_FILE}: shard 0 is the URL 'http://127.0.0.1:9/data/" in message
    assert "--allow-remote" not in message and "data.remote_allow=[http://127.0.0.1:9/]" in message
    for prefix in (
        "http://127.0.0.1:9/other/",
        "http://127.0.0.1:99/",
        "https://127.0.0.1:9/",
        "http://127.0.0.1:9/da",
    ):
        with pytest.raises(UserError):
            open_datasets([str(remote)], trust=Trust(remote_prefixes=(prefix,)))
    for prefix in ("http://127.0.0.1:9/", "http://127.0.0.1:9/data", "HTTP://127.0.0.1:9/data/"):
        ref = open_datasets([str(remote)], trust=Trust(remote_prefixes=(prefix,)))[0]
        assert isinstance(ref.locations[0], Allowed) and ref.locations[0].startswith("http://127.0.0.1:9/data/")


def test_verify_reports_a_url_it_may_not_fetch(remote):
    proc = data_tools("verify", str(remote))
    assert proc.returncode == ExitCode.DATA, proc.stdout + proc.stderr
    assert (
        "shard 0 is the URL 'http://127.0.0.1:9/data/" in proc.stdout
        and "--allow-remote http://127.0.0.1:9/" in proc.stdout
        and "OK" not in proc.stdout
    )


def test_prefix_matching_is_by_host_and_whole_path_segments():
    from data_tools.trust import url_allowed

    assert url_allowed("https://bucket.org/data/a.tar", "https://bucket.org/data/")
    assert url_allowed("https://bucket.org/data/a.tar?x=1", "https://bucket.org/")
    assert not url_allowed("https://bucket.org.evil.net/data/a.tar", "https://bucket.org/")
    assert not url_allowed("https://bucket.org@evil.net/data/a.tar", "https://bucket.org/")
    assert not url_allowed("https://bucket.org/database/a.tar", "https://bucket.org/data")
    assert not url_allowed("https://bucket.org/data/../secret/a.tar", "https://bucket.org/data/")
    assert not url_allowed("gs://bucket.org/data/a.tar", "https://bucket.org/")


def test_bad_opt_ins_are_one_line_usage_errors(local):
    from data_tools.errors import ConfigError

    with pytest.raises(ConfigError) as bad:
        config(local, remote_allow=["bucket.org/data"])
    assert bad.value.exit_code == ExitCode.USAGE and "data.remote_allow" in str(bad.value)
    proc = data_tools("stats", str(local), "--allow-remote", "pipe:cat x")
    assert proc.returncode == ExitCode.USAGE and proc.stderr.count("\n") == 1 and "--allow-remote" in proc.stderr


def test_open_shard_refuses_a_location_that_skipped_the_gate(tmp_path):
    from data_tools.remote import open_shard

    marker = tmp_path / "MARK"
    for location in (f"pipe:touch {marker}", "http://127.0.0.1:9/a.tar"):
        with pytest.raises(RuntimeError, match="did not pass data_tools.trust"):
            open_shard(location)
    assert not marker.exists()


def test_a_local_tar_named_like_a_command_stays_a_path(tmp_path):
    from data_tools.builders.img2dataset import shard_location
    from data_tools.trust import location_kind

    assert shard_location(tmp_path / "pipe:touch x.tar", tmp_path) == "./pipe:touch x.tar"
    assert location_kind(shard_location(tmp_path / "a://b.tar", tmp_path)) == "path"
    assert [
        location_kind(x) for x in ("shards/a.tar", "/abs/a.tar", "PIPE:cat a", "file:///a.tar", "gs://b/a.tar")
    ] == ["path", "path", "pipe", "file", "url"]


# --- tokenizer folders ---------------------------------------------------------------------------
def test_a_tokenizer_folder_auto_map_never_runs(local, tmp_path):
    from data_tools.collate import load_tokenizer

    folder, marker = tmp_path / "tokenizer", tmp_path / "MARK"
    shutil.copytree(local / "tokenizer", folder)
    (folder / "planted.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import BertTokenizerFast as PlantedTokenizerFast\n"
    )
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("tokenizer_class", None)
    settings["auto_map"] = {"AutoTokenizer": [None, "planted.PlantedTokenizerFast"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(UserError) as refused:
        load_tokenizer(folder)
    assert "custom code" in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists() and "planted" not in sys.modules
