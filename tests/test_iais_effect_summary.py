"""bench/iais_effect.py's paired comparison: per seed, the IAIS variant minus `off` at the same seed; the mean
of those differences with a 95 % interval from Student's t. The README's IAIS conclusion is read from it."""

from __future__ import annotations

import pytest

from bench import iais_effect


def _runs() -> list[dict]:
    off = [{"variant": "off", "seed": s, "recall/rsum": 100.0 + s, "relation/relation": 0.5} for s in range(4)]
    exp = [
        {"variant": "exp", "seed": s, "recall/rsum": 100.0 + s + d, "relation/relation": 0.5 + r}
        for s, d, r in zip(range(4), (1, 3, 2, 2), (0.02, -0.02, 0.01, -0.01))
    ]
    unpaired = [{"variant": "exp", "seed": 9, "recall/rsum": 500.0, "relation/relation": 1.0}]  # no `off` at seed 9
    return off + exp + unpaired


def test_paired_mean_difference_and_its_t_interval():
    (row,) = iais_effect.paired(_runs(), ["off", "exp"], keys=("recall/rsum", "relation/relation"))
    assert row["variant"] == "exp - off" and row["pairs"] == 4  # seed 9 has no partner: left out
    # differences 1, 3, 2, 2: mean 2, sd sqrt(2/3); t(0.975, 3) = 3.1824; half width 3.1824 * 0.8165 / 2 = 1.2992
    assert row["recall/rsum"] == 2.0
    assert row["recall/rsum:ci95"] == pytest.approx([0.7008, 3.2992], abs=1e-4)
    assert row["relation/relation"] == 0.0  # +2, -2, +1, -1 points: an interval around 0
    low, high = row["relation/relation:ci95"]
    assert low < 0 < high and high == pytest.approx(-low)


def test_the_table_prints_each_difference_with_its_interval():
    rows = iais_effect.paired(_runs(), ["off", "exp"], keys=("recall/rsum",))
    text = iais_effect.paired_table(rows, keys=("recall/rsum",))
    assert "| exp - off | 4 | +2.000 [+0.701, +3.299] |" in text


def test_one_pair_gives_no_interval():
    runs = [r for r in _runs() if r["seed"] in (0, 9)]
    (row,) = iais_effect.paired(runs, ["off", "exp"], keys=("recall/rsum",))
    assert row["pairs"] == 1 and "recall/rsum" not in row  # a mean of one difference decides nothing


def test_an_out_folder_keeps_the_recipe_its_runs_were_trained_with(tmp_path):
    """Finished runs are skipped, so a rerun into the same --out with another preset, override or size is
    refused in one line naming what differs, before any run starts."""
    import argparse

    parser = argparse.ArgumentParser()
    iais_effect.add_run_arguments(parser, ["off", "exp"], tmp_path, preset="configs/tiny_relations.yaml")
    first = iais_effect.recipe(parser.parse_args([]))
    assert first["preset_sha256"] and first["overrides"] == []
    iais_effect.check_recipe(tmp_path, first)
    iais_effect.check_recipe(tmp_path, iais_effect.recipe(parser.parse_args(["--seeds", "5"])))  # seeds may grow
    other = iais_effect.recipe(parser.parse_args(["--set", "objectives.itm.weight=1.0", "--pretrain-steps", "9"]))
    with pytest.raises(SystemExit, match=r"another recipe \(overrides, pretrain_steps differ from recipe.json\)"):
        iais_effect.check_recipe(tmp_path, other)
    edited = {**first, "preset_sha256": "0" * 64}  # the preset file changed since
    with pytest.raises(SystemExit, match=r"preset_sha256 differ"):
        iais_effect.check_recipe(tmp_path, edited)
