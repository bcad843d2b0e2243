"""`hf-regionmm`: the command line of the library.

    hf-regionmm demo                       train every registered system's tiny model on synthetic data, report metrics
    hf-regionmm train SYSTEM --stage S [--model DIR] [--data FORMAT --data-option NAME=VALUE ...]
                                           train a system (tiny config, or the checkpoint DIR) on the synthetic set or
                                           on real-format data (hf_regionmm.data.formats.DATA_FORMATS)
    hf-regionmm eval SYSTEM CHECKPOINT [--data FORMAT --data-option NAME=VALUE ...]
                                           evaluate a checkpoint on held-out synthetic data or real-format data
    hf-regionmm convert SYSTEM SRC DST [--option NAME=VALUE ...]
                                           convert an original release checkpoint to this library's layout
    hf-regionmm card SYSTEM CHECKPOINT     render the model card of a checkpoint folder (+ evaluation JSON)
    hf-regionmm release SYSTEM CHECKPOINT REPO_ID   evaluate, fill the card, push weights + processor + card (+ code)

`demo` is the embedded default job: it needs no argument, no network and no GPU, and writes everything (checkpoints
with model cards, pictures, metrics JSON) under one folder that it names at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _progress(message: str) -> None:
    print(f"[hf-regionmm {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _systems(names: Sequence[str] | None):
    from .registry import get_system, registered_systems

    return [get_system(n) for n in names] if names else registered_systems()


def _format_table(rows: list[tuple[str, str, str]]) -> str:
    header = ("system", "metric", "value")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def _generic_demo(spec: Any, output_dir: Path, progress) -> dict[str, float]:
    """Fallback demo for a system without its own: 30 steps of its trainer recipe, early vs late training loss."""
    from transformers.trainer_callback import PrinterCallback

    from .hub.model_card import write_model_card
    from .trainers.tiny_training import build_tiny_trainer

    if spec.training is None:
        raise ValueError(f"System {spec.name!r} has neither a demo nor a training recipe.")
    trainer = build_tiny_trainer(spec, output_dir / "trainer", max_steps=30, logging_steps=1)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    window = max(1, len(losses) // 6)
    metrics = {
        "loss_first_steps": sum(losses[:window]) / window,
        "loss_last_steps": sum(losses[-window:]) / window,
    }
    checkpoint = output_dir / "checkpoint"
    trainer.model.save_pretrained(checkpoint)
    trainer.processing_class.save_pretrained(checkpoint)
    if spec.card_template:
        write_model_card(checkpoint, spec.card_template, model_id=f"{spec.name}-tiny-demo", eval_results=metrics)
    progress(f"{spec.name}: training loss {metrics['loss_first_steps']:.3f} -> {metrics['loss_last_steps']:.3f}")
    return metrics


def _cmd_demo(args: argparse.Namespace) -> int:
    output_root = Path(args.output_dir or f"hf_regionmm_outputs/demo-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    output_root.mkdir(parents=True, exist_ok=True)
    specs = _systems(args.systems)
    if not specs:
        print("No system is registered; nothing to demo.", file=sys.stderr)
        return 1
    rows: list[tuple[str, str, str]] = []
    results: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for spec in specs:
        _progress(f"demo: {spec.name}")
        system_dir = output_root / spec.name
        system_dir.mkdir(parents=True, exist_ok=True)
        run = spec.demo or _generic_demo
        metrics = run(system_dir, _progress) if spec.demo else run(spec, system_dir, _progress)
        results[spec.name] = metrics
        rows.extend((spec.name, name, f"{value:.4f}") for name, value in metrics.items())
    elapsed = time.perf_counter() - started
    (output_root / "metrics.json").write_text(json.dumps({"seconds": elapsed, "systems": results}, indent=2))
    print()
    print(_format_table(rows))
    print(f"\nDemo finished in {elapsed / 60:.1f} min. Outputs (checkpoints, model cards, pictures, metrics.json):")
    print(f"  {output_root}")
    return 0


def _real_data(args: argparse.Namespace) -> Any:
    """The scenes of `--data FORMAT --data-option NAME=VALUE ...`, or None without `--data`."""
    from .data.formats import load_data_format

    if args.data is None:
        if args.data_option:
            raise ValueError("`--data-option` needs `--data FORMAT` (e.g. --data refcoco).")
        return None
    return load_data_format(args.data, args.data_option or [])


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .evaluation.checkpoint_eval import load_checkpoint
    from .registry import get_system
    from .trainers.region_trainer import stage_by_name
    from .trainers.tiny_training import build_tiny_trainer

    spec = get_system(args.system)
    if spec.training is None:
        raise ValueError(f"System {spec.name!r} has no training recipe yet; nothing to train.")
    model = processor = train_dataset = None
    if args.model is not None:
        # Start from a saved checkpoint, e.g. the previous stage's output (det -> align -> instruct).
        model, processor = load_checkpoint(args.model, spec.model_classes[spec.main_auto_class], name="--model")
    scenes = _real_data(args)
    if scenes is not None:
        recipe = spec.training
        if recipe.dataset_from_scenes is None:
            raise ValueError(f"System {spec.name!r} does not train on real-format data yet; drop `--data`.")
        stage = args.stage or recipe.default_stage
        if recipe.stages:
            stage_by_name(recipe.stages, stage)
        train_dataset = recipe.dataset_from_scenes(processor or spec.tiny_processor(), scenes, args.seed, stage)
        _progress(f"{len(scenes)} scenes from --data {args.data}")
    trainer = build_tiny_trainer(
        spec,
        args.output_dir,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        num_samples=args.num_samples,
        seed=args.seed,
        logging_steps=max(1, args.max_steps // 20),
        model=model,
        processor=processor,
        train_dataset=train_dataset,
        stage=args.stage,
        use_stage_optimizer=True,
        # The tiny synthetic runs pin the CPU; a user's run takes the accelerator when there is one, as Trainer does.
        use_cpu=args.cpu,
        dataloader_pin_memory=not args.cpu and torch.accelerator.is_available(),
    )
    _progress(f"training on {trainer.args.device}")
    trainer.train()
    trainer.save_model(args.output_dir)
    trainer.processing_class.save_pretrained(args.output_dir)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    if logged:
        _progress(f"loss {logged[0]['loss']:.4f} -> {logged[-1]['loss']:.4f}")
    _progress(f"saved {spec.name} to {Path(args.output_dir).resolve()}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .registry import get_system

    spec = get_system(args.system)
    if spec.evaluate is None:
        raise ValueError(f"System {spec.name!r} has no evaluation routine yet.")
    output_dir = Path(args.output_dir or Path(args.checkpoint) / "eval")
    output_dir.mkdir(parents=True, exist_ok=True)
    scenes = _real_data(args)
    if scenes is None:
        metrics = spec.evaluate(args.checkpoint, output_dir, num_samples=args.num_samples)
    else:
        import inspect

        if "scenes" not in inspect.signature(spec.evaluate).parameters:
            raise ValueError(f"System {spec.name!r} does not evaluate on real-format data yet; drop `--data`.")
        metrics = spec.evaluate(args.checkpoint, output_dir, num_samples=args.num_samples, scenes=scenes)
    (output_dir / "metrics.json").write_text(json.dumps({"metrics": metrics}, indent=2))
    print(_format_table([(spec.name, k, f"{v:.4f}") for k, v in metrics.items()]))
    return 0


def _converter_options(convert: Any, pairs: Sequence[str]) -> dict[str, str]:
    """`--option NAME=VALUE` pairs as keyword arguments, checked against the converter's keyword-only parameters."""
    import inspect

    from .data.formats import parse_name_value_pairs

    accepted = [
        name
        for name, parameter in inspect.signature(convert).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    return parse_name_value_pairs(pairs, accepted, "--option", "this converter", example="blip2=path/to/blip2")


def _cmd_convert(args: argparse.Namespace) -> int:
    from .registry import get_system

    spec = get_system(args.system)
    if spec.convert is None:
        raise ValueError(f"System {spec.name!r} has no checkpoint converter yet.")
    spec.convert(args.source, args.destination, **_converter_options(spec.convert, args.option or []))
    _progress(f"converted {args.source} -> {args.destination}")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from .hub.model_card import write_model_card

    path = write_model_card(
        args.checkpoint, args.system, eval_json=args.eval_json, model_id=args.model_id or Path(args.checkpoint).name
    )
    _progress(f"wrote {path}")
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from .hub.publish import release

    commit = release(
        args.system,
        args.checkpoint,
        args.repo_id,
        with_code=args.with_code,
        eval_json=args.eval_json,
        eval_options={"num_samples": args.num_samples},
        private=True if args.private else None,
        commit_message=args.commit_message,
    )
    _progress(f"released {args.checkpoint} to {args.repo_id} in one commit: {commit.commit_url}")
    return 0


def _add_data_arguments(command: argparse.ArgumentParser) -> None:
    from .data.formats import DATA_FORMATS

    command.add_argument(
        "--data",
        choices=sorted(DATA_FORMATS),
        help="real-format data instead of the synthetic set (its loader in hf_regionmm.data.loaders)",
    )
    command.add_argument(
        "--data-option",
        action="append",
        metavar="NAME=VALUE",
        help="a parameter of the --data loader, repeatable (e.g. --data-option images_dir=coco/val2017)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-regionmm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train every registered system's tiny model on synthetic data")
    demo.add_argument("--output-dir", help="folder for all outputs (default: hf_regionmm_outputs/demo-<time>)")
    demo.add_argument("--systems", nargs="+", help="only these systems (default: all registered)")
    demo.set_defaults(func=_cmd_demo)

    train = commands.add_parser(
        "train", help="train a system (tiny model or --model DIR) on synthetic or real-format data"
    )
    train.add_argument("system")
    train.add_argument("--stage", help="training stage of the paper (e.g. det, align, instruct for Groma)")
    train.add_argument("--output-dir", required=True)
    train.add_argument("--max-steps", type=int, default=100)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--num-samples", type=int, default=256)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--model", help="start from this checkpoint folder (e.g. the previous stage's --output-dir)")
    train.add_argument(
        "--cpu", action="store_true", help="train on the CPU even when a GPU is present (default: the GPU if any)"
    )
    _add_data_arguments(train)
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on held-out synthetic data or real-format data")
    evaluate.add_argument("system")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--output-dir")
    evaluate.add_argument("--num-samples", type=int, default=64)
    _add_data_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    convert = commands.add_parser("convert", help="convert an original release checkpoint")
    convert.add_argument("system")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument(
        "--option",
        action="append",
        metavar="NAME=VALUE",
        help="a converter keyword argument, repeatable (e.g. --option blip2=path/to/blip2 --option model_type=vit-l)",
    )
    convert.set_defaults(func=_cmd_convert)

    card = commands.add_parser("card", help="render the model card of a checkpoint folder")
    card.add_argument("system")
    card.add_argument("checkpoint")
    card.add_argument("--eval-json", help="JSON with metric name -> value (e.g. the output of `eval`)")
    card.add_argument("--model-id", help="repository id shown in the card (default: the folder name)")
    card.set_defaults(func=_cmd_card)

    release = commands.add_parser(
        "release", help="evaluate a checkpoint, fill its card and push it (+ remote code) to the Hub in one commit"
    )
    release.add_argument("system")
    release.add_argument("checkpoint", help="folder written by save_pretrained (safetensors only)")
    release.add_argument("repo_id", help="target repository, e.g. org/groma-tiny")
    release.add_argument("--with-code", action="store_true", help="also publish the code (trust_remote_code=True)")
    release.add_argument("--eval-json", help="metrics to publish instead of running the system's evaluation")
    release.add_argument("--num-samples", type=int, default=64, help="evaluation samples when no --eval-json")
    release.add_argument("--private", action="store_true", help="create the repository as private")
    release.add_argument("--commit-message")
    release.set_defaults(func=_cmd_release)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The Hub is unreachable on the machines this library is tested on; nothing here downloads anything, except
    # `release`, whose job is to push (it refuses when offline mode is on).
    if args.command != "release":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import hf_regionmm  # noqa: F401  (registers every system)

    try:
        return args.func(args)
    except ValueError as error:
        print(f"hf-regionmm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
