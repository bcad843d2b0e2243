"""Run every benchmark module and write bench/results/results.{json,md} (and, with --update-readme, README's table).

python -m bench.run                  # full repetitions
python -m bench.run --quick          # fewer repetitions and smaller inputs (smoke check)
python -m bench.run --update-readme  # also replace the table between the bench markers in README.md
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from .harness import write_results

MODULES = [
    "bench.blocks",
    "bench.groma",
    "bench.regionblip",
    "bench.tap",
    "bench.ullava",
    "bench.processors",
    "bench.training",
]
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", help="module names, e.g. bench.blocks")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    comparisons = []
    for name in args.only or MODULES:
        comparisons.extend(importlib.import_module(name).run(quick=args.quick))
    print(write_results(comparisons, args.output_dir, ROOT / "README.md" if args.update_readme else None))


if __name__ == "__main__":
    main()
