"""The ``bayeslora`` command line: train | eval | calibrate | laplace | export | report | demo | env | tasks | methods.

``train`` flags are generated from :class:`~bayeslora.config.RunConfig` (the field help is the flag help),
so a flag, a recipe key and a ``config.yaml`` entry are the same thing. Precedence: defaults < ``--config``
recipe < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from .assets import AssetNotInstalledError
from .config import RunConfig, coerce_value, field_type, make_config
from .methods.laplace import LAPLACE_OPTIONS


def _add_config_flags(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per RunConfig field (or the fields in ``only``), defaulting to "not given"."""
    for f in dataclasses.fields(RunConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        scalar, is_list, _ = field_type(f)
        kwargs: dict = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            if is_list:
                kwargs["nargs"] = "+"
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
                kwargs["help"] += f" Choices: {', '.join(f.metadata['choices'])}."
        parser.add_argument(flag, **kwargs)


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    overrides = {key: coerce_value(key, value) for key, value in vars(args).items() if key in names}
    return make_config(getattr(args, "config", None), **overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import train

    config = _config_from_args(args)
    run = train(config, progress=not args.quiet)
    print(f"\nRun written to {run}")
    _print_run_metrics(run)
    return 0


def _print_run_metrics(run) -> None:
    from .io import read_json
    from .reporting.tables import format_table
    from .runs import EVAL_DIR

    rows = [read_json(p) for p in sorted((run / EVAL_DIR).glob("*/metrics.json"))]
    if rows:
        print(format_table(rows))


#: The run options `bayeslora eval` can change for an evaluation: how the model is scored and loaded, and
#: how an ensemble's members are combined or a Laplace posterior predicts.
EVAL_CONFIG_OPTIONS = (
    "scoring",
    "cloze_normalization",
    "num_layers",
    "max_length",
    "dtype",
    "eval_batch_size",
    "force_base",
    "ensemble_combine",
    "laplace_predictive",
)

FORCE_BASE_HELP = "Load the adapter even onto a base model other than the one it was trained on (not advised)."


def _cmd_eval(args: argparse.Namespace) -> int:
    from .pipeline import evaluate
    from .reporting.tables import format_table

    options = {key: coerce_value(key, value) for key, value in vars(args).items() if key in EVAL_CONFIG_OPTIONS}
    metrics = evaluate(
        args.run,
        model=args.model,
        task=args.task,
        samples=args.samples,
        limit=args.limit,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        progress=not args.quiet,
        **options,
    )
    print(format_table([metrics]))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline.demo import run_demo

    run_demo(args.output_dir, progress=not args.quiet)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .pipeline import export

    written = export(args.run, args.to, args.out, force_base=args.force_base, progress=not args.quiet)
    print(
        f"Exported {args.run} as {written['format']} to {written['out']}: {written['bytes']:,} bytes of tensors "
        f"({written['ratio']:.2f}x the {written['reference_16bit_lora_bytes']:,} bytes of the 16-bit LoRA of the "
        f"same rank)"
    )
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .pipeline import calibrate
    from .reporting.tables import format_table

    records = calibrate(
        args.run,
        task=args.task,
        heldout=args.heldout,
        overwrite=args.overwrite,
        force_base=args.force_base,
        progress=not args.quiet,
    )
    print(format_table(records))
    print(
        f"temperature T = {records[0]['temperature']:.3f}, fitted on {records[0]['temperature_examples']} "
        f"held-out training examples"
    )
    return 0


def _cmd_laplace(args: argparse.Namespace) -> int:
    from .pipeline import laplace

    options = {key: coerce_value(key, value) for key, value in vars(args).items() if key in LAPLACE_OPTIONS}
    run = laplace(
        args.run,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        force_base=args.force_base,
        progress=not args.quiet,
        **options,
    )
    print(f"\nLaplace run written to {run}")
    _print_run_metrics(run)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .reporting.report import run_report

    text = run_report(args.runs, sequence_length=args.sequence_length, out=args.out)
    print(text)
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from . import assets
    from .system import device_summary, versions

    info = {
        "versions": versions(),
        "devices": device_summary(),
        "cache_dir": str(assets.cache_dir()),
        "embedded_assets": assets.installed_assets(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import TASKS

    for spec in TASKS.values():
        print(f"{spec.name:15s} {spec.kind:16s} {spec.description}")
    print(f"{'mmlu:<subject>':15s} {'multiple-choice':16s} one MMLU subject (evaluation only)")
    print(f"{'<file>.jsonl':15s} {'either':16s} a local JSONL file (see README, 'Task files')")
    print(f"{'hf:<id>':15s} {'either':16s} a Hugging Face dataset (needs the network)")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    for method in (m for m in METHODS.values() if m.trains):
        print(f"{method.name:12s} {method.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bayeslora`` command."""
    parser = argparse.ArgumentParser(
        prog="bayeslora",
        description="Bayesian fine-tuning of language models with low-rank adapters.",
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback on errors.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="Fine-tune a model, then evaluate it.")
    train.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe of options (flags override it).")
    _add_config_flags(train)
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("eval", help="Evaluate a run (or a base model zero-shot).")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="Run directory written by `bayeslora train`.")
    source.add_argument("--model", help="Evaluate this base model zero-shot instead of a run.")
    evaluate.add_argument("--task", help="Evaluation task (default: the run's training task).")
    evaluate.add_argument("--samples", type=int, help="Posterior samples (0: posterior mean).")
    evaluate.add_argument("--limit", type=int, help="Fixed seeded subsample of this many examples.")
    evaluate.add_argument("--output-dir", help="Write eval/<task>/ here instead of into the run.")
    evaluate.add_argument("--overwrite", action="store_true", help="Replace an existing eval/<task>/.")
    _add_config_flags(evaluate, only=EVAL_CONFIG_OPTIONS)
    evaluate.set_defaults(handler=_cmd_eval)

    demo = commands.add_parser("demo", help="Fine-tune the embedded default and print the calibration table.")
    demo.add_argument("--output-dir", default=None, help="Where the demo runs go (default: runs/demo-<time>).")
    demo.set_defaults(handler=_cmd_demo)

    exporter = commands.add_parser("export", help="Export a run's adapter (plain PEFT LoRA, or packed low-bit).")
    exporter.add_argument("--run", required=True, help="Run directory written by `bayeslora train`.")
    exporter.add_argument(
        "--to",
        choices=("lora", "packed"),
        default="lora",
        help="lora: a PEFT LoRA adapter that loads without bayeslora (B-LoRA truncated to its learned ranks, "
        "dequantized; posterior mean for Bayesian adapters); packed: B-LoRA's integer codes at the learned "
        "bit-widths (read back with bayeslora.exporters.load_packed).",
    )
    exporter.add_argument("--out", required=True, help="New directory to write (never overwritten).")
    exporter.add_argument("--force-base", action="store_true", help=FORCE_BASE_HELP)
    exporter.set_defaults(handler=_cmd_export)

    calibrator = commands.add_parser(
        "calibrate", help="Temperature scaling of a run: fit T on held-out training data, rescale its evaluations."
    )
    calibrator.add_argument("--run", required=True, help="Run directory written by `bayeslora train`.")
    calibrator.add_argument("--task", help="Only this evaluation (default: every eval/<task>/ of the run).")
    calibrator.add_argument(
        "--heldout", type=int, default=200, help="Training examples the run never saw that T is fitted on."
    )
    calibrator.add_argument("--overwrite", action="store_true", help="Replace existing eval/<task>-ts/.")
    calibrator.add_argument("--force-base", action="store_true", help=FORCE_BASE_HELP)
    calibrator.set_defaults(handler=_cmd_calibrate)

    laplacian = commands.add_parser(
        "laplace", help="Laplace-LoRA post hoc: a K-FAC Laplace posterior over a LoRA (or MAP) run's weights."
    )
    laplacian.add_argument("--run", required=True, help="A finished `--method lora` or `--method map` run.")
    laplacian.add_argument("--output-dir", help="The new run directory (default: <run>-laplace).")
    laplacian.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    _add_config_flags(laplacian, only=LAPLACE_OPTIONS)
    laplacian.add_argument("--force-base", action="store_true", help=FORCE_BASE_HELP)
    laplacian.set_defaults(handler=_cmd_laplace)

    report = commands.add_parser("report", help="One table of every run's evaluations, and B-LoRA's bit operations.")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Run directories.")
    report.add_argument("--sequence-length", type=int, default=1, help="Bit operations for this many tokens.")
    report.add_argument("--out", help="Also write report.md (and the tables' JSON) into this directory.")
    report.set_defaults(handler=_cmd_report)

    commands.add_parser("env", help="Versions, devices, cache and embedded assets.").set_defaults(handler=_cmd_env)
    commands.add_parser("tasks", help="List the built-in tasks.").set_defaults(handler=_cmd_tasks)
    commands.add_parser("methods", help="List the methods.").set_defaults(handler=_cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayeslora`` console script; errors print one clear message and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError, AssetNotInstalledError) as error:
        if args.debug:
            raise
        print(f"bayeslora {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
