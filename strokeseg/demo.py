"""The main job: the paper's pipeline end to end on generated synthetic data.

Every stage runs as a user would run it: the top-level script in a subprocess with its real
flags. Outputs land in ``--out`` (one folder per stage); a stage that fails stops the demo
with its exit status.

    python -m strokeseg.demo --out demo_run
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .runner import get_logger, write_run_args
from .synthetic import make_isles

REPO = Path(__file__).resolve().parents[1]


def run_stage(name: str, script: str, args: list[str], log_dir: Path) -> None:
    """Run ``python <script> <args>`` from the repository root; its output goes to
    ``log_dir/<name>.log``. Raises SystemExit with the stage's status when it fails."""
    log = get_logger()
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / script), *args]
    start = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as out:
        status = subprocess.call(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    log.info(f"stage {name}: exit {status} ({time.perf_counter() - start:.0f} s); log {log_dir / (name + '.log')}")
    if status != 0:
        raise SystemExit(f"stage {name} failed (exit {status}); see {log_dir / (name + '.log')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_run"), help="output folder (default demo_run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    parser.add_argument("--isles-cases", type=int, default=12, help="synthetic ISLES cases (default 12)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = get_logger()
    args.out.mkdir(parents=True, exist_ok=True)
    write_run_args(args.out, args)
    raw, logs = args.out / "raw", args.out / "logs"
    isles_ids = make_isles(raw / "ISLES2022", args.isles_cases, layout="A", seed=args.seed)
    log.info(f"synthetic ISLES 2022: {len(isles_ids)} cases in {raw / 'ISLES2022'}")
    isles_in = ["--isles-dir", str(raw / "ISLES2022" / "derivatives")]
    run_stage("preprocess_isles_train", "preprocess_v2_isles.py", isles_in + ["--output-dir", str(args.out / "isles_train")], logs)
    run_stage("preprocess_isles_eval", "preprocess_isles_WITH_BBOX.py", isles_in + ["--output-dir", str(args.out / "isles_eval")], logs)
    log.info(f"done: outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
