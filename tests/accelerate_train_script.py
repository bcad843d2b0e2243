"""Train a registered system's tiny model for 3 steps and write the logged losses as JSON.

Run by `tests/test_contract.py` once as a plain process and once under `accelerate launch` with two CPU processes;
both must log the same losses (total and named terms) at the same global batch.
"""

import argparse
import json
import tempfile

from accelerate import PartialState

import hf_regionmm  # noqa: F401  (registers the systems)
from hf_regionmm.registry import get_system
from hf_regionmm.trainers.tiny_training import build_tiny_trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    state = PartialState()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_tiny_trainer(get_system(args.system), output_dir, max_steps=3, batch_size=args.batch_size)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    terms = {k: [h[k] for h in logs] for k in logs[0] if k.startswith("loss_")}
    if state.is_main_process:
        with open(args.output, "w") as f:
            json.dump({"world_size": state.num_processes, "losses": [h["loss"] for h in logs], "terms": terms}, f)


if __name__ == "__main__":
    main()
