"""The frozen base's precision and memory layout on this CPU: fp32 against bf16, strided against contiguous.

Measured side by side in one process on the packaged SmolLM2-135M (cloze scoring, ARC-Easy, LoRA and
Me-LoRA at rank 8 on q_proj, v_proj and lm_head):

* what ``--dtype auto`` chose on this machine, and the probe's matmul timings it chose by;
* the time of one training step (8 questions, AdamW) and of one evaluation pass (16 validation questions;
  Me-LoRA averaging 10 posterior samples in one tiled pass) for each base dtype, with the LM head's input a
  contiguous copy (what bayeslora does) or the strided slice that ``logits_to_keep=<count>`` hands it (what it
  did before). All configurations run on the same fixed batches in interleaved rounds; the table gives the
  median over rounds and each time relative to fp32 with the strided input;
* quality: LoRA and Me-LoRA trained with the demo's recipe (80 training questions, 80 steps) once per base
  dtype, evaluated on the same 300 validation questions; the bf16 − fp32 differences of accuracy, ECE, NLL
  and Brier with their 95 % paired-bootstrap intervals, and the ECE of a perfectly calibrated model at that
  size (the noise floor).

    python benchmarks/dtype.py              # writes benchmarks/results/dtype.json and dtype.md (~30 min)
    python benchmarks/dtype.py --quick      # 2 timing rounds, 60 evaluation questions, 20 training steps
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _shared import interval_text

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "dtype" / "runs"
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("strided", "contiguous")
METHODS = ("lora", "melora")
TARGETS = ["q_proj", "v_proj", "lm_head"]
EVAL_SAMPLES = {"lora": 1, "melora": 10}


@contextlib.contextmanager
def lm_head_input(layout: str):
    """Within the block the scorers hand the LM head a ``layout`` input: ``contiguous`` (bayeslora's index tensor)
    or ``strided`` (a count, as bayeslora did before, which transformers turns into a strided slice)."""
    from bayeslora.evaluation import scoring

    original = scoring.kept_positions
    if layout == "strided":
        scoring.kept_positions = lambda model, start, length, device: {"logits_to_keep": length - start}
    try:
        yield
    finally:
        scoring.kept_positions = original


def timings(rounds: int) -> list[dict[str, Any]]:
    """Training-step and evaluation-pass times of every (method, dtype, layout), interleaved over ``rounds``."""
    import torch
    from peft import LoraConfig, get_peft_model

    import bayeslora as bl
    from bayeslora.tasks import DATA_SEED, seeded_subset

    task = bl.load_task("arc-easy")
    train_batch = seeded_subset(task.split("train"), 8, DATA_SEED)
    eval_batch = seeded_subset(task.split("eval"), 16, DATA_SEED)
    setups = {}
    for method in METHODS:
        for dtype in DTYPES:
            torch.manual_seed(0)
            model, tokenizer = bl.load_model("smollm2-135m", dtype=dtype, progress=False)
            config = (
                LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
                if method == "lora"
                else bl.MeLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
            )
            model = get_peft_model(model, config)
            scorer = bl.make_scorer(task, tokenizer, "cloze")
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            setups[(method, dtype)] = (
                model,
                scorer,
                optimizer,
                scorer.collate(train_batch),
                scorer.collate(eval_batch),
            )
    times: dict[tuple[str, str, str, str], list[float]] = {}
    for round_ in range(rounds + 1):  # round 0 warms up (allocator, optimizer state) and is not kept
        for (method, dtype), (model, scorer, optimizer, train, evaluation) in setups.items():
            for layout in LAYOUTS:
                with lm_head_input(layout):
                    model.train()
                    started = time.perf_counter()
                    logits = scorer.class_logits(model, train)
                    torch.nn.functional.cross_entropy(logits, train["labels"]).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    step = time.perf_counter() - started
                    model.eval()
                    started = time.perf_counter()
                    bl.predict_batch(model, scorer, evaluation, EVAL_SAMPLES[method])
                    evaluate = time.perf_counter() - started
                if round_:
                    times.setdefault((method, dtype, layout, "step"), []).append(step)
                    times.setdefault((method, dtype, layout, "eval"), []).append(evaluate)
                print(f"round {round_} {method} {dtype} {layout}: step {step:.2f} s, eval {evaluate:.2f} s", flush=True)
    rows = []
    for (method, dtype, layout, kind), values in times.items():
        baseline = statistics.median(times[(method, "float32", "strided", kind)])
        rows.append(
            {
                "method": method,
                "dtype": dtype,
                "layout": layout,
                "measure": kind,
                "median_s": statistics.median(values),
                "vs_fp32_strided": statistics.median(values) / baseline,
                "all_s": values,
            }
        )
    return rows


def quality(limit: int, steps: int) -> list[dict[str, Any]]:
    """LoRA and Me-LoRA trained with the demo's recipe in each base dtype, and the bf16 − fp32 differences."""
    import bayeslora as bl
    from bayeslora.evaluation import load_predictions
    from bayeslora.evaluation.significance import calibrated_ece_floor, compare
    from bayeslora.io import read_json
    from bayeslora.pipeline.demo import DEMO_RECIPE, DEMO_SAMPLES
    from bayeslora.runs import eval_dir

    rows = []
    for method in METHODS:
        predictions, metrics = {}, {}
        for dtype in DTYPES:
            run = RUNS / f"{method}-{dtype}-{steps}steps-{limit}q"
            if not (eval_dir(run, "arc-easy") / "metrics.json").is_file():
                if run.exists():
                    import shutil

                    shutil.rmtree(run)
                recipe = {**DEMO_RECIPE, "max_steps": steps, "limit": limit}
                samples = {"samples": DEMO_SAMPLES} if method != "lora" else {}
                bl.train(method=method, dtype=dtype, output_dir=str(run), progress=False, **recipe, **samples)
            predictions[dtype] = load_predictions(eval_dir(run, "arc-easy"))
            metrics[dtype] = read_json(eval_dir(run, "arc-easy") / "metrics.json")
        fp32, bf16 = predictions["float32"], predictions["bfloat16"]
        assert bool((fp32.labels == bf16.labels).all()), "both evaluations must hold the same questions"
        differences = compare(bf16.probs, fp32.probs, fp32.labels)
        floor = calibrated_ece_floor(fp32.probs)
        rows.append(
            {
                "method": method,
                "n_examples": int(fp32.labels.shape[0]),
                "float32": {k: metrics["float32"][k] for k in ("accuracy", "ece", "nll", "brier", "step_time_s")},
                "bfloat16": {k: metrics["bfloat16"][k] for k in ("accuracy", "ece", "nll", "brier", "step_time_s")},
                "bf16_minus_fp32": {name: d.to_dict() for name, d in differences.items()},
                "ece_floor": {"mean": floor[0], "std": floor[1]},
            }
        )
    return rows


def markdown(verdict: dict[str, Any], timing_rows: list[dict[str, Any]], quality_rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Precision and layout of the frozen base (SmolLM2-135M, 2 CPU threads)",
        "",
        f"`--dtype auto` on this CPU: **{verdict['dtype']}** (probe: a 512 x 1024 by 1024 x 1024 linear layer, "
        f"fp32 {verdict['float32_ms']:.2f} ms, bf16 {verdict['bfloat16_ms']:.2f} ms; {verdict['cpu']}).",
        "",
        "Time of a training step (8 ARC-Easy questions, cloze, AdamW) and of an evaluation pass (16 questions; "
        "Me-LoRA with 10 posterior samples in one tiled pass); median over interleaved rounds, and relative to "
        "fp32 with the strided LM-head input (what bayeslora did before):",
        "",
        "| method | measure | fp32 strided | fp32 contiguous | bf16 strided | bf16 contiguous |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for kind in ("step", "eval"):
            cells = []
            for dtype in DTYPES:
                for layout in LAYOUTS:
                    row = next(
                        r
                        for r in timing_rows
                        if (r["method"], r["measure"], r["dtype"], r["layout"]) == (method, kind, dtype, layout)
                    )
                    cells.append(f"{row['median_s']:.2f} s ({row['vs_fp32_strided']:.2f}x)")
            lines.append(f"| {method} | {kind} | " + " | ".join(cells) + " |")
    if quality_rows:
        lines += [
            "",
            f"Quality: the demo's recipe trained in each dtype, {quality_rows[0]['n_examples']} ARC-Easy validation "
            "questions; bf16 − fp32 with its 95 % paired-bootstrap interval (a difference is real only where the "
            "interval excludes 0):",
            "",
            "| method | fp32 acc / ECE / NLL | bf16 acc / ECE / NLL | Δ accuracy (pts) | Δ ECE (pts) | Δ NLL | "
            "ECE of a calibrated model (pts) | step time bf16 / fp32 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in quality_rows:
            fp32, bf16, d = row["float32"], row["bfloat16"], row["bf16_minus_fp32"]
            lines.append(
                f"| {row['method']} | {100 * fp32['accuracy']:.1f} / {100 * fp32['ece']:.1f} / {fp32['nll']:.3f} | "
                f"{100 * bf16['accuracy']:.1f} / {100 * bf16['ece']:.1f} / {bf16['nll']:.3f} | "
                f"{interval_text(d['accuracy'], 100, 1)} | {interval_text(d['ece'], 100, 1)} | "
                f"{interval_text(d['nll'])} | "
                f"{100 * row['ece_floor']['mean']:.1f} ± {100 * row['ece_floor']['std']:.1f} | "
                f"{bf16['step_time_s'] / fp32['step_time_s']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 timing rounds, 60 questions, 20 training steps")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--skip-quality", action="store_true", help="timings only")
    args = parser.parse_args(argv)
    import torch

    from bayeslora.io import write_json_atomic, write_text_atomic
    from bayeslora.precision import cpu_probe_verdict

    torch.set_num_threads(2)
    rounds, limit, steps = (2, 60, 20) if args.quick else (args.rounds, 300, 80)
    verdict = cpu_probe_verdict()
    timing_rows = timings(rounds)
    quality_rows = [] if args.skip_quality else quality(limit, steps)
    tag = "dtype-quick" if args.quick else "dtype"
    write_json_atomic(
        RESULTS / f"{tag}.json",
        {"probe": verdict, "rounds": rounds, "timings": timing_rows, "quality": quality_rows},
    )
    table = markdown(verdict, timing_rows, quality_rows)
    write_text_atomic(RESULTS / f"{tag}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
