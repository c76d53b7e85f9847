"""The ``bayeslora`` command line: train | eval | predict | generate | lm-eval | calibrate | laplace | export | report |
posterior | demo | env | tasks | methods.

``train`` flags are generated from :class:`~bayeslora.config.RunConfig` (the field help is the flag help),
so a flag, a recipe key and a ``config.yaml`` entry are the same thing. Precedence: defaults < ``--config``
recipe < flags.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import sys
from collections.abc import Sequence

from .assets import AssetNotInstalledError
from .config import OPTION_GROUP_USERS, SECTIONS, RunConfig, coerce_value, field_type, flag, make_config
from .methods.laplace import LAPLACE_OPTIONS


def _default_text(f: dataclasses.Field) -> str:
    """What ``--help`` says of an option's default: the value, or that the method chooses it."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if default is None:
        return "" if "default" in f.metadata.get("help", "") else " (default: not set)"
    if isinstance(default, bool):
        return f" (default: {'on' if default else 'off'})"
    if isinstance(default, list):
        return f" (default: {' '.join(map(str, default))})"
    return f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"


def _add_config_flags(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per RunConfig field (or the fields in ``only``), defaulting to "not given" so that a recipe can
    sit between the defaults and the flags; grouped in ``--help`` by section and by the methods that use them, each
    with its default and choices."""
    titles = {section: f"{section} options" for section in SECTIONS}
    titles.update({group: f"{group} options: for {users}" for group, users in OPTION_GROUP_USERS.items()})
    fields = [f for f in dataclasses.fields(RunConfig) if only is None or f.name in only]
    present = {f.metadata.get("section") or f.metadata["group"] for f in fields}
    groups = {key: parser.add_argument_group(title) for key, title in titles.items() if key in present}
    for f in fields:
        key = f.metadata.get("section") or f.metadata["group"]
        scalar, is_list, _ = field_type(f)
        help_text = f.metadata.get("help", "")
        kwargs: dict = {"default": argparse.SUPPRESS}
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            kwargs["type"] = str  # coerced (and checked) by config.coerce_value, as recipe values are
            if is_list:
                kwargs["nargs"] = "+"
            if "choices" in f.metadata:
                kwargs["choices"] = [str(choice) for choice in f.metadata["choices"]]
                kwargs["metavar"] = "{" + ",".join(kwargs["choices"]) + "}"
        kwargs["help"] = help_text + _default_text(f)
        groups[key].add_argument(flag(f.name), **kwargs)


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
    "chat_template",
    "cloze_normalization",
    "num_layers",
    "max_length",
    "dtype",
    "eval_batch_size",
    "force_base",
    "ensemble_combine",
    "laplace_predictive",
    "posterior_predictive",
    "sample_layers",
)

SAMPLE_LAYERS_HELP = "Sample the posterior of the top K blocks and the head only, its mean below (default: the run's)."
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
        ood_tasks=args.ood_tasks,
        heldout=args.heldout,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        progress=not args.quiet,
        **options,
    )
    print(format_table([metrics]))
    return 0


def _write_lines(records: list[dict], output: str | None, overwrite: bool) -> None:
    """JSON lines to ``output`` (atomically, an existing file only with ``overwrite``), or to stdout."""
    from .pipeline.predict import write_predictions

    if output is None:
        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    else:
        write_predictions(records, output, overwrite=overwrite)
        print(f"{len(records)} records written to {output}", file=sys.stderr)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .pipeline import predict_inputs

    options = {"force_base": True} if args.force_base else {}
    if args.sample_layers:
        options["sample_layers"] = args.sample_layers
    records = predict_inputs(
        args.run, args.input, samples=args.samples, batch_size=args.batch_size, progress=not args.quiet, **options
    )
    _write_lines(records, args.output, args.overwrite)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .pipeline.generate import generate_answers, load_prompts

    if not args.prompt and not args.input:
        raise ValueError("give prompts with --prompt TEXT (repeatable) or --input prompts.jsonl")
    pairs = [(i, text) for i, text in enumerate(args.prompt or [], start=1)]
    if args.input:
        pairs += load_prompts(args.input)
    decoding = {key: getattr(args, key) for key in ("do_sample", "temperature", "top_p", "num_beams")}
    if args.stop:
        decoding["stop"] = [codecs.decode(text, "unicode_escape") for text in args.stop]
    records = generate_answers(
        args.run,
        [prompt for _, prompt in pairs],
        ids=[i for i, _ in pairs],
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        progress=not args.quiet,
        sample_layers=args.sample_layers,
        **{key: value for key, value in decoding.items() if value is not None},
    )
    _write_lines(records, args.output, args.overwrite)
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from .lm_eval import main as lm_eval_main
    except ImportError as error:
        raise ValueError(
            f"`bayeslora lm-eval` needs lm-evaluation-harness ({error}): pip install 'bayeslora[lm-eval]'"
        ) from error
    return lm_eval_main(list(args.lm_eval_args))


def _cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline.demo import run_demo

    run_demo(args.output_dir, progress=not args.quiet)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .pipeline import export

    written = export(args.run, args.to, args.output_dir, force_base=args.force_base, progress=not args.quiet)
    print(
        f"Exported {args.run} as {written['format']} to {written['out']}: {written['bytes']:,} bytes (tensors and "
        f"the config that decodes them) "
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

    text = run_report(args.runs, sequence_length=args.sequence_length, out=args.output_dir)
    print(text)
    return 0


def _cmd_posterior(args: argparse.Namespace) -> int:
    from .pipeline.posterior import posterior_report

    print(posterior_report(args.runs, out=args.output_dir))
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


def _version() -> str:
    """``bayeslora <version>`` and the versions of the libraries it runs on."""
    from . import __version__
    from .system import versions

    found = versions()
    libraries = ", ".join(f"{name} {found[name]}" for name in ("torch", "transformers", "peft") if found.get(name))
    return f"bayeslora {found.get('bayeslora') or __version__} ({libraries}; Python {found['python']})"


def _output_dir(parser: argparse.ArgumentParser, help: str, *, required: bool = False, default=None) -> None:
    """The output flag every command that writes takes: ``--output-dir`` (``--out``, its earlier name on ``export``
    and ``report``, is still accepted)."""
    names = parser.add_mutually_exclusive_group(required=required)
    names.add_argument("--output-dir", help=help, default=default)
    names.add_argument("--out", dest="output_dir", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bayeslora`` command."""
    parser = argparse.ArgumentParser(
        prog="bayeslora",
        description="Bayesian fine-tuning of language models with low-rank adapters.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--quiet", action="store_true", help="No progress bars (also after the command).")
    parser.add_argument(
        "--debug", action="store_true", help="Show the full traceback on errors (also after the command)."
    )
    # the same two flags after the command; "not given" there leaves the value given before it
    anywhere = argparse.ArgumentParser(add_help=False)
    anywhere.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="No progress bars.")
    anywhere.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="Show the full traceback on errors."
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return subcommands.add_parser(name, help=help, description=help, parents=[anywhere])

    train = command("train", "Fine-tune a model, then evaluate it.")
    train.usage = "bayeslora train [--config RECIPE.yaml] [options]   (options by group below)"
    train.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe of options (flags override it).")
    _add_config_flags(train)
    train.set_defaults(handler=_cmd_train)

    evaluate = command("eval", "Evaluate a run (or a base model zero-shot).")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="Run directory written by `bayeslora train`.")
    source.add_argument("--model", help="Evaluate this base model zero-shot instead of a run.")
    evaluate.add_argument("--task", help="Evaluation task (default: the run's training task).")
    evaluate.add_argument("--samples", type=int, help="Posterior samples (0: posterior mean).")
    evaluate.add_argument("--limit", type=int, help="Fixed seeded subsample of this many examples.")
    evaluate.add_argument(
        "--heldout",
        type=int,
        metavar="N",
        help="Instead of --task, evaluate on N training examples the run did not train on (those after its "
        "--train-size subset) into eval/<task>-heldout/: for choosing hyperparameters without the evaluation set.",
    )
    evaluate.add_argument(
        "--ood-tasks",
        nargs="+",
        default=(),
        metavar="TASK",
        help="Also evaluate these tasks as out of distribution: the task's metrics.json then records, per task, the "
        "AUROC of telling them apart by predictive entropy and by mutual information.",
    )
    _output_dir(evaluate, "Write eval/<task>/ here instead of into the run.")
    evaluate.add_argument("--overwrite", action="store_true", help="Replace an existing eval/<task>/.")
    _add_config_flags(evaluate, only=EVAL_CONFIG_OPTIONS)
    evaluate.set_defaults(handler=_cmd_eval)

    predictor = command(
        "predict",
        "Predict rows without answers (multiple choice or classification JSONL) with a run: per row its class "
        "probabilities, prediction, confidence, predictive entropy, expected entropy (aleatoric) and mutual "
        "information (epistemic).",
    )
    predictor.add_argument("--run", required=True, help="Run directory written by `bayeslora train`.")
    predictor.add_argument(
        "--input",
        required=True,
        metavar="FILE.jsonl",
        help='Rows {"question", "choices"} or {"text"[, "text_pair"]}, each optionally with "id" (else its line '
        'number) and "answer"/"label" (then also reported).',
    )
    predictor.add_argument("--output", metavar="OUT.jsonl", help="Write JSON lines here (default: standard output).")
    predictor.add_argument("--samples", type=int, help="Posterior samples (default: the method's; 0: posterior mean).")
    predictor.add_argument("--batch-size", type=int, help="Rows per forward pass (default: the run's).")
    predictor.add_argument("--sample-layers", metavar="all|last:K", help=SAMPLE_LAYERS_HELP)
    predictor.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    predictor.add_argument("--force-base", action="store_true", help=FORCE_BASE_HELP)
    predictor.set_defaults(handler=_cmd_predict)

    generator = command(
        "generate",
        "Answer free-text prompts with a run: N answers per prompt, each under its own posterior sample, with the "
        "share that agree and the entropy over distinct answers (JSON lines).",
    )
    generator.add_argument("--run", required=True, help="Run directory written by `bayeslora train` (a causal LM).")
    generator.add_argument("--prompt", action="append", metavar="TEXT", help="A prompt (repeat for more).")
    generator.add_argument(
        "--input", metavar="FILE.jsonl", help='Prompts {"prompt": text} or {"messages": [...]}, optionally with "id".'
    )
    generator.add_argument("--samples", type=int, help="Answers per prompt (default: the method's; 0: posterior mean).")
    generator.add_argument("--sample-layers", metavar="all|last:K", help=SAMPLE_LAYERS_HELP)
    generator.add_argument("--max-new-tokens", type=int, default=32, help="Longest answer (default: 32).")
    generator.add_argument("--batch-size", type=int, default=4, help="Prompts per generate call (default: 4).")
    generator.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Render plain prompts with the tokenizer's chat template (messages always are; default: off).",
    )
    generator.add_argument("--do-sample", action="store_true", default=None, help="Sample tokens (default: greedy).")
    generator.add_argument("--temperature", type=float, help="Decoding temperature (with --do-sample).")
    generator.add_argument("--top-p", type=float, help="Nucleus sampling (with --do-sample).")
    generator.add_argument("--num-beams", type=int, help="Beam search per answer (all beams share its sample).")
    generator.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="End an answer at this string (repeatable; escapes such as \\n are read): e.g. --stop '\\n' for "
        "one-line answers.",
    )
    generator.add_argument("--output", metavar="OUT.jsonl", help="Write JSON lines here (default: standard output).")
    generator.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    generator.set_defaults(handler=_cmd_generate)

    harness = command(
        "lm-eval",
        "lm-evaluation-harness with the `bayeslora` model type: any lm-eval task on a run, Bayesian adapters through "
        "their posterior predictive. Everything after `lm-eval` is lm-eval's own command line, e.g. "
        "`bayeslora lm-eval --model bayeslora --model_args run=DIR,samples=10 --tasks arc_easy`.",
    )
    harness.add_argument("lm_eval_args", nargs="*", metavar="LM_EVAL_ARGS", help="lm-eval's own arguments.")
    harness.set_defaults(handler=_cmd_lm_eval)

    demo = command("demo", "Fine-tune the embedded default and print the calibration table.")
    _output_dir(demo, "Where the demo runs go (default: runs/demo-<time>).", default=None)
    demo.set_defaults(handler=_cmd_demo)

    exporter = command("export", "Export a run's adapter (plain PEFT LoRA, or packed low-bit).")
    exporter.add_argument("--run", required=True, help="Run directory written by `bayeslora train`.")
    exporter.add_argument(
        "--to",
        choices=("lora", "packed"),
        default="lora",
        help="lora: a PEFT LoRA adapter that loads without bayeslora (B-LoRA truncated to its learned ranks, "
        "dequantized; posterior mean for Bayesian adapters); packed: B-LoRA's integer codes at the learned "
        "bit-widths (read back with bayeslora.exporters.load_packed).",
    )
    _output_dir(exporter, "New directory to write (never overwritten).", required=True)
    exporter.add_argument("--force-base", action="store_true", help=FORCE_BASE_HELP)
    exporter.set_defaults(handler=_cmd_export)

    calibrator = command(
        "calibrate", "Temperature scaling of a run: fit T on held-out training data, rescale its evaluations."
    )
    calibrator.add_argument("--run", required=True, help="Run directory written by `bayeslora train`.")
    calibrator.add_argument("--task", help="Only this evaluation (default: every eval/<task>/ of the run).")
    calibrator.add_argument(
        "--heldout", type=int, default=200, help="Training examples the run never saw that T is fitted on."
    )
    calibrator.add_argument("--overwrite", action="store_true", help="Replace existing eval/<task>-ts/.")
    calibrator.add_argument("--force-base", action="store_true", help=FORCE_BASE_HELP)
    calibrator.set_defaults(handler=_cmd_calibrate)

    laplacian = command(
        "laplace", "Laplace-LoRA post hoc: a K-FAC Laplace posterior over a LoRA (or MAP) run's weights."
    )
    laplacian.add_argument("--run", required=True, help="A finished `--method lora` or `--method map` run.")
    _output_dir(laplacian, "The new run directory (default: <run>-laplace).")
    laplacian.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    _add_config_flags(laplacian, only=LAPLACE_OPTIONS)
    laplacian.add_argument("--force-base", action="store_true", help=FORCE_BASE_HELP)
    laplacian.set_defaults(handler=_cmd_laplace)

    report = command("report", "One table of every run's evaluations, and B-LoRA's bit operations.")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Run directories.")
    report.add_argument("--sequence-length", type=int, default=1, help="Bit operations for this many tokens.")
    _output_dir(report, "Also write report.md, report.html and the figures into this directory.")
    report.set_defaults(handler=_cmd_report)

    posterior = command(
        "posterior",
        "How wide each run's posterior is, per module kind: the noise of ΔW relative to its mean update and to the "
        "frozen weight, and σ relative to the mean of each random entry.",
    )
    posterior.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Run directories of Bayesian adapters.")
    _output_dir(posterior, "Also write posterior.md and posterior.json (every layer) into this directory.")
    posterior.set_defaults(handler=_cmd_posterior)

    command("env", "Versions, devices, cache and embedded assets.").set_defaults(handler=_cmd_env)
    command("tasks", "List the built-in tasks.").set_defaults(handler=_cmd_tasks)
    command("methods", "List the methods.").set_defaults(handler=_cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayeslora`` console script; errors print one clear message and exit 2."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on: list[str] = []
    at = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)  # the command
    if at is not None and argv[at] == "lm-eval":  # everything after it is lm-eval's own command line
        argv, passed_on = argv[: at + 1], argv[at + 1 :]
    args = parser.parse_args(argv)
    if args.command == "lm-eval":
        args.lm_eval_args = passed_on
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
