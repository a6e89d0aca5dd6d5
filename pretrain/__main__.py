"""`python -m pretrain`: pretraining, and `python -m pretrain export RUN --out DIR`.

    python -m pretrain --config configs/tiny.yaml data.paths=[DIR] train.steps=50 [--resume auto|PATH]
    torchrun --nproc_per_node 2 -m pretrain --config ...      (also deepspeed --module, srun, accelerate launch -m)
    python -m pretrain export runs/tiny --out exported/

The configuration is validated before any process group starts (a mistake: one line, exit code 2).
Exit codes: data_tools.errors.ExitCode (0 done, 2 configuration, 4 non-finite stop, 5 lost rank,
75 preempted with a checkpoint saved: resume me).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from data_tools.errors import ExitCode, OneLineParser, UserError, is_local_leader, run_cli


def training_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments every training command takes: --config, --resume, dotted overrides."""
    parser = OneLineParser(prog=prog, allow_abbrev=False, description=description)
    parser.add_argument("--config", help="YAML preset, e.g. configs/tiny.yaml")
    parser.add_argument("--resume", help="auto (newest complete checkpoint of the run, if any) or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 optimizer.lr=1e-4")
    return parser


def _export_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m pretrain export",
        allow_abbrev=False,
        description="Consolidated safetensors weights + model config + tokenizer of a run.",
    )
    parser.add_argument("run", help="run folder, checkpoints folder or checkpoint tag folder")
    parser.add_argument("--out", required=True, help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; the environment carries the same information.
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if argv and argv[0] == "export":
        args = _export_parser().parse_args(argv[1:])
        from pretrain.export import export_run

        path = export_run(args.run, args.out)
        print(f"exported {path}")
        return ExitCode.OK
    args = training_parser(
        "python -m pretrain", "Pretrain a single-stream image-text encoder (see configs/)."
    ).parse_intermixed_args(argv)
    if args.config is None and not args.overrides:
        raise UserError("python -m pretrain: give --config FILE (e.g. configs/tiny.yaml) and/or overrides")
    from pretrain.config import load_config

    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    cfg, resume = prepare(load_config, args.config, overrides)
    return run_training(cfg, resume)


def prepare(load, config: str | None, overrides: list[str]):
    """Every check before any process group starts: the configuration (with the DeepSpeed JSON a
    launcher names, e.g. accelerate's deepspeed_config_file, where zero.deepspeed_config is unset)
    and the one resume check. Returns (cfg, pretrain.checkpoint.Resume or None)."""
    from pretrain import dist_env
    from pretrain.checkpoint import check_resume

    cfg = load(config, overrides)
    launcher_json = dist_env.launcher_deepspeed_config()
    if launcher_json and cfg.zero.deepspeed_config is None:
        cfg = load(config, [*overrides, f"zero.deepspeed_config={launcher_json}"])
    return cfg, check_resume(cfg)


def run_training(cfg, resume, task_factory=None, prog: str = "pretrain") -> int:
    """Start the process group, train `task_factory(cfg)` (default: pretraining), tear down and exit
    the process with the run's code. Shared by every training command (`prog` names it in errors)."""
    from pretrain import dist_env

    env = dist_env.detect()
    if "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher does not set it: share the cores
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    dist_env.init_distributed(env, timeout_s=cfg.train.lost_rank_timeout_s)
    from pretrain.watchdog import RankWatchdog

    watchdog = RankWatchdog(env, cfg.train.lost_rank_timeout_s)  # a dead peer: exit LOST_RANK, never hang
    watchdog.start()
    code: int = ExitCode.FAILURE
    try:
        from pretrain.train import train

        code = int(train(cfg, env, task_factory(cfg) if task_factory else None, resume))
    except UserError as err:
        code = int(err.exit_code)
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    except RuntimeError as err:  # a collective failed: most likely a peer died
        if env.world_size > 1:
            watchdog.on_comm_error(err)  # exits with LOST_RANK naming the rank, or raises err again
        raise
    finally:
        watchdog.stop()
    dist_env.shutdown(barrier=code in (ExitCode.OK, ExitCode.PREEMPTED, ExitCode.NONFINITE))
    dist_env.exit_process(code)


main.__module__ = "pretrain.__main__"  # run_cli names the program after it; under -m it would be "__main__"


def entry() -> int:
    # Every rank of a launcher validates the same configuration: one of them per node says what is wrong.
    return run_cli(main, quiet=not is_local_leader())


if __name__ == "__main__":
    sys.exit(entry())
