"""What is done to a finished run: export its adapter, calibrate its predictions with a temperature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .adapters import load_adapter
from .api import build_scorer, load_base, prediction_options, resolve_samples
from .config import make_config
from .evaluation import evaluate_model, write_evaluation
from .io import read_json
from .runs import ADAPTER_DIR, RunExistsError, eval_dir, read_run_config
from .tasks import DATA_SEED, HELDOUT_EXAMPLES, load_task, seeded_heldout


def export(
    run: str | Path, to: str, out: str | Path, *, force_base: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Export the adapter of a run: ``to="lora"`` a plain PEFT LoRA adapter (B-LoRA truncated to its learned
    ranks and dequantized; the posterior mean of Me-LoRA and BLoB), ``to="packed"`` B-LoRA's integer codes at
    their learned bit-widths. Returns what was written and its size against the 16-bit LoRA adapter.
    ``force_base``: load the adapter even if its base model's fingerprint differs."""
    from .exporters import EXPORT_FORMATS, PACKED_WEIGHTS, export_lora, export_packed, reference_lora_bytes

    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format '{to}': {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if out.exists():
        raise RunExistsError(f"{out} already exists; choose another --out (exports never overwrite).")
    config = make_config(**read_run_config(run))
    task = load_task(config.task)
    network, _ = load_base(config, task, progress=progress)
    network = load_adapter(network, Path(run) / ADAPTER_DIR, force=force_base)
    if to == "lora":
        export_lora(network, out)
        size = (out / "adapter_model.safetensors").stat().st_size
    else:
        export_packed(network, out)
        size = (out / PACKED_WEIGHTS).stat().st_size  # the factors; a classifier head is stored apart
    reference = reference_lora_bytes(network)
    return {
        "format": to,
        "out": str(out),
        "bytes": size,
        "reference_16bit_lora_bytes": reference,
        "ratio": size / reference,
    }


def calibrate(
    run: str | Path,
    *,
    task: str | None = None,
    heldout: int = HELDOUT_EXAMPLES,
    overwrite: bool = False,
    force_base: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Temperature scaling of a trained run (post hoc, any method).

    One temperature T is fitted on ``heldout`` training examples the run never trained on (those that follow
    its ``--train-size`` subset in the same seeded order), predicted the way the method predicts (posterior
    samples, MC dropout, ensemble members). The saved predictions of every evaluation of the run (or of
    ``task``) are rescaled as softmax(log p / T) and written to ``eval/<task>-ts/`` as method
    ``<method>+ts``. Returns the new metrics records.
    """
    from .evaluation import load_predictions
    from .metrics import classification_metrics
    from .temperature import fit_temperature, scaled

    run = Path(run)
    config = make_config(**read_run_config(run))
    train_task = load_task(config.task)
    sources = [eval_dir(run, task)] if task else sorted(p.parent for p in (run / "eval").glob("*/metrics.json"))
    sources = [d for d in sources if not d.name.endswith("-ts")]
    if not sources or not all((d / "metrics.json").is_file() for d in sources):
        raise FileNotFoundError(
            f"{run} has no evaluation{' on ' + task if task else ''} to calibrate; run "
            f"`bayeslora eval --run {run}` first"
        )
    targets = [d.with_name(d.name + "-ts") for d in sources]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise RunExistsError(f"{', '.join(existing)} already exist(s). Pass --overwrite to replace.")
    examples = seeded_heldout(train_task.split("train"), config.train_size, heldout, DATA_SEED)
    network, tokenizer = load_base(config, train_task, progress=progress)
    network = load_adapter(network, run / ADAPTER_DIR, force=force_base)
    n_samples = resolve_samples(config, None)
    scorer = build_scorer(train_task, tokenizer, config, num_classes=train_task.num_classes)
    torch.manual_seed(config.seed)
    _, fitted_on = evaluate_model(
        network,
        scorer,
        examples,
        n_samples=n_samples,
        batch_size=config.eval_batch_size,
        progress=progress,
        **prediction_options(config, n_samples, run),
    )
    temperature = fit_temperature(fitted_on.probs, fitted_on.labels)
    records = []
    for source, target in zip(sources, targets, strict=True):
        before = read_json(source / "metrics.json")
        prediction = load_predictions(source)
        prediction.probs = scaled(prediction.probs, temperature).float()
        prediction.sample_probs = None  # the temperature applies to the averaged prediction only
        record = {
            **before,
            "method": f"{before['method']}+ts",
            **classification_metrics(prediction.probs, prediction.labels),
            "temperature": temperature,
            "temperature_examples": len(examples),
            "calibrated_from": str(source),
        }
        write_evaluation(target, record, prediction, f"{record['method']} on {before['task']} (T = {temperature:.2f})")
        records.append(record)
    return records
