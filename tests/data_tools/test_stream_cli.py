"""`python -m data_tools stream`: one `step rank key` line per sample, exactly once per epoch, the
same order as the real Loader, cursor continuation equal to the uninterrupted run, --decode with
bad samples on stderr, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_tools.loader import DataConfig, Loader
from tests.data_tools.test_loader import SYNTHETIC_SAMPLES, minilm, planted, synthetic  # noqa: F401  (fixtures)


def stream(capsys, *argv: str) -> tuple[int, list[tuple[int, int, str]], str]:
    from data_tools.__main__ import main
    from data_tools.errors import run_cli

    code = run_cli(main, ["stream", *argv])
    out, err = capsys.readouterr()
    lines = [(int(a), int(b), c) for a, b, c in (line.split() for line in out.splitlines())]
    return code, lines, err


def test_lines_cover_the_epoch_once_in_the_loaders_order(synthetic, capsys):
    code, lines, _ = stream(
        capsys, str(synthetic), "--world-size", "2", "--workers", "2", "--batch-size", "4", "--shuffle-block", "3"
    )
    assert code == 0
    assert sorted(k for _, _, k in lines) == [f"s3-{i:09d}" for i in range(SYNTHETIC_SAMPLES)]
    steps = {r: sorted({s for s, rr, _ in lines if rr == r}) for r in (0, 1)}
    assert steps[0] == steps[1] == list(range(len(steps[0])))
    assert all(sum(1 for s, rr, _ in lines if (s, rr) == (t, r)) <= 4 for t in steps[0] for r in (0, 1))
    # the same code as the loader with real worker processes (no decoding here, full decoding there)
    cfg = DataConfig(paths=[str(synthetic)], batch_size=4, workers=2, shuffle_block=3, image_size=16)
    for rank in (0, 1):
        loader_keys = [
            (b["cursor"]["step"] - 1, k) for b in Loader(cfg, rank=rank, world_size=2) for k in b["key"] if k
        ]
        assert loader_keys == [(s, k) for s, r, k in lines if r == rank]


@pytest.mark.parametrize("resume_layout", [[], ["--world-size", "3", "--workers", "0", "--batch-size", "5"]])
def test_cursor_continuation_equals_the_uninterrupted_run(synthetic, capsys, tmp_path, resume_layout):
    layout = [
        "--world-size",
        "2",
        "--workers",
        "2",
        "--batch-size",
        "3",
        "--shuffle-block",
        "4",
        "--seed",
        "9",
        "--epoch",
        "2",
    ]
    _, full, _ = stream(capsys, str(synthetic), *layout)
    cursor = tmp_path / "cursor.json"
    code, head, _ = stream(capsys, str(synthetic), *layout, "--steps", "3", "--save-cursor", str(cursor))
    assert code == 0 and max(s for s, _, _ in head) == 2
    saved = json.loads(cursor.read_text())
    assert saved["step"] == 3 and saved["epoch"] == 2
    new_layout = layout if not resume_layout else ["--shuffle-block", "4", "--seed", "9", *resume_layout]
    code, tail, _ = stream(capsys, str(synthetic), *new_layout, "--cursor", str(cursor))
    assert code == 0
    if not resume_layout:
        assert head + tail == full  # same layout: exactly the rest of the uninterrupted listing
    else:
        assert sorted(k for _, _, k in head + tail) == sorted(k for _, _, k in full)  # re-cut: none skipped or repeated
        assert min(s for s, _, _ in tail) == 3


def test_decode_omits_bad_samples_and_reports_them(planted, capsys):
    path, _ = planted
    code, lines, err = stream(
        capsys, str(path), "--world-size", "2", "--batch-size", "2", "--decode", "--max-pixels", "10000"
    )
    assert code == 0
    assert sorted(k for _, _, k in lines) == ["g00", "g01", "g02", "g03", "g04"]
    for reason in ("refused_member", "decode_error", "empty_caption", "bad_metadata", "bad_utf8", "too_many_pixels"):
        assert f": {reason}: " in err
    code, all_lines, _ = stream(capsys, str(path), "--world-size", "2", "--batch-size", "2")
    assert len(all_lines) == 11  # without decoding every stored sample is listed


def test_user_errors_are_one_line_and_exit_2(synthetic, tmp_path, capsys):
    bad_cursor = tmp_path / "c.json"
    bad_cursor.write_text("{not json")
    other_seed = tmp_path / "other.json"
    assert stream(capsys, str(synthetic), "--steps", "1", "--seed", "1", "--save-cursor", str(other_seed))[0] == 0
    for argv, needle in [
        ([str(synthetic), "--cursor", str(bad_cursor)], "not a JSON cursor"),
        ([str(synthetic), "--cursor", str(tmp_path / "absent.json")], "absent.json"),
        ([str(synthetic), "--cursor", str(other_seed)], "seed=1 does not match"),
        ([str(synthetic), "--weights", "1", "2"], "--weights"),
    ]:
        code, lines, err = stream(capsys, *argv)
        assert code == 2 and lines == [] and len(err.strip().splitlines()) == 1 and needle in err, (argv, err)
    # the real command line: argparse and UserError paths both exit 2 without a traceback
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv, needle in [
        ([str(tmp_path / "missing")], "no such dataset folder"),
        ([str(synthetic), "--batch-size", "0"], "--batch-size"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "data_tools", "stream", *argv], capture_output=True, text=True, timeout=120, env=env
        )
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in proc.stderr, (
            proc.stderr
        )
