"""The tools around a trained run, measured on one: generation with uncertainty, prediction on unlabelled questions,
and lm-evaluation-harness next to ``bayeslora eval``.

For a multiple-choice run (e.g. Me-LoRA on ARC-Easy with the packaged SmolLM2) this runs, through the command line:

1. ``bayeslora generate`` on the first ``--generate`` evaluation questions (cloze prompts), ``--samples`` answers each;
2. ``bayeslora predict`` on the first ``--predict`` evaluation questions with their answers removed, then joins the
   answers back and compares the mutual information (epistemic uncertainty) of the questions it got right and wrong
   (means, their difference with a bootstrap 95 % interval, and the AUROC of MI for telling wrong from right);
3. ``bayeslora lm-eval`` on a local lm-eval task over the run's own evaluation questions (``--limit``), next to
   ``bayeslora eval`` on the same questions with sum and mean cloze normalisation.

Writes ``<out>/pipeline_tools.json`` and ``.md`` (and the raw outputs beside them)::

    python benchmarks/pipeline_tools.py --run runs/arc-easy-melora --out benchmarks/results/pipeline_tools
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bayeslora.evaluation import eval_examples
from bayeslora.evaluation.uncertainty import ood_auroc
from bayeslora.io import read_json, write_json_atomic, write_text_atomic
from bayeslora.lm_eval import local_multiple_choice_task
from bayeslora.runs import read_run_config
from bayeslora.tasks import load_task


def _cli(*args: str) -> str:
    """Run ``bayeslora ARGS`` quietly; its standard output."""
    done = subprocess.run([sys.executable, "-m", "bayeslora", "--quiet", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bayeslora {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _bootstrap_difference(a: torch.Tensor, b: torch.Tensor, draws: int = 10000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of mean(a) − mean(b) (independent groups)."""
    generator = torch.Generator().manual_seed(seed)
    ia = torch.randint(len(a), (draws, len(a)), generator=generator)
    ib = torch.randint(len(b), (draws, len(b)), generator=generator)
    differences = a[ia].mean(1) - b[ib].mean(1)
    return [float(differences.quantile(0.025)), float(differences.quantile(0.975))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--generate", type=int, default=3, help="questions to generate answers for")
    parser.add_argument("--predict", type=int, default=100, help="unlabelled questions to predict")
    parser.add_argument("--limit", type=int, default=300, help="questions lm-eval and bayeslora eval score")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    options = parser.parse_args()
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    config = read_run_config(options.run)
    questions = eval_examples(load_task(config["task"]), options.limit)  # the run's own seeded evaluation subset
    record: dict = {"run": str(options.run), "task": config["task"], "method": config["method"]}

    # 1. generation with uncertainty
    prompts = out / "generate_prompts.jsonl"
    write_text_atomic(prompts, "".join(json.dumps({"id": i, "prompt": q.contexts[0]}) + "\n"
                                       for i, q in enumerate(questions[: options.generate])))  # fmt: skip
    _cli("generate", "--run", str(options.run), "--input", str(prompts), "--samples", str(options.samples),
         "--max-new-tokens", str(options.max_new_tokens), "--stop", "\\n", "--output", str(out / "generate.jsonl"),
         "--overwrite")  # fmt: skip
    generated = _rows(out / "generate.jsonl")
    record["generate"] = [
        {
            "question": questions[g["id"]].question,
            "answer_key": questions[g["id"]].choices[questions[g["id"]].answer],
            "majority": g["majority"],
            "agreement": g["agreement"],
            "answer_entropy": g["answer_entropy"],
            "distinct": g["distinct"],
        }
        for g in generated
    ]

    # 2. prediction on unlabelled questions, answers joined afterwards
    unlabelled = out / "predict_input.jsonl"
    chosen = questions[: options.predict]
    rows = [{"id": f"q{i}", "question": q.question, "choices": list(q.choices)} for i, q in enumerate(chosen)]
    write_text_atomic(unlabelled, "".join(json.dumps(row) + "\n" for row in rows))
    _cli("predict", "--run", str(options.run), "--input", str(unlabelled), "--samples", str(options.samples),
         "--output", str(out / "predict.jsonl"), "--overwrite")  # fmt: skip
    predicted = _rows(out / "predict.jsonl")
    right = torch.tensor([p["prediction"] == q.answer for p, q in zip(predicted, chosen, strict=True)])
    mi = torch.tensor([p["mutual_information"] for p in predicted], dtype=torch.float64)
    entropy = torch.tensor([p["entropy"] for p in predicted], dtype=torch.float64)
    record["predict"] = {
        "questions": len(chosen),
        "accuracy": float(right.double().mean()),
        "mean_mi_right": float(mi[right].mean()),
        "mean_mi_wrong": float(mi[~right].mean()),
        "mi_difference_wrong_minus_right_ci95": _bootstrap_difference(mi[~right], mi[right]),
        "auroc_mi_wrong_vs_right": ood_auroc(mi[right], mi[~right]),
        "mean_entropy_right": float(entropy[right].mean()),
        "mean_entropy_wrong": float(entropy[~right].mean()),
        "auroc_entropy_wrong_vs_right": ood_auroc(entropy[right], entropy[~right]),
    }

    # 3. lm-eval on a local task over the same questions, next to bayeslora eval
    data = out / "lm_eval_questions.jsonl"
    write_text_atomic(data, "".join(json.dumps({"question": q.question, "choices": list(q.choices), "answer": q.answer})
                                    + "\n" for q in questions))  # fmt: skip
    tasks = out / "lm_eval_tasks"
    tasks.mkdir(exist_ok=True)
    write_text_atomic(tasks / "local.yaml", local_multiple_choice_task("bayeslora_local_mc", data))
    _cli("lm-eval", "--model", "bayeslora", "--model_args", f"run={options.run},samples={options.samples}",
         "--tasks", "bayeslora_local_mc", "--include_path", str(tasks), "--output_path", str(out / "lm_eval"),
         "--batch_size", "8")  # fmt: skip
    results = read_json(sorted((out / "lm_eval").rglob("results*.json"))[-1])["results"]["bayeslora_local_mc"]
    record["lm_eval"] = {"acc": results["acc,none"], "acc_norm": results["acc_norm,none"], "questions": len(questions)}
    for normalization in ("sum", "mean"):
        target = out / f"eval-{normalization}"
        _cli("eval", "--run", str(options.run), "--samples", str(options.samples), "--limit", str(options.limit),
             "--cloze-normalization", normalization, "--output-dir", str(target), "--overwrite")  # fmt: skip
        metrics = read_json(next(target.rglob("metrics.json")))
        record["lm_eval"][f"bayeslora_eval_{normalization}"] = {k: metrics[k] for k in ("accuracy", "ece", "nll")}

    write_json_atomic(out / "pipeline_tools.json", record)
    write_text_atomic(out / "pipeline_tools.md", _markdown(record, options))
    print(_markdown(record, options))


def _markdown(record: dict, options) -> str:
    p, lm = record["predict"], record["lm_eval"]
    lines = [f"# Tools around a run: {record['method']} on {record['task']} ({record['run']})", "",
             f"## bayeslora generate ({options.samples} samples, greedy, one line, ≤ {options.max_new_tokens} tokens)",
             "",
             "| question | answer key | most common answer | agreement | answer entropy (nats) | distinct |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for g in record["generate"]:
        lines.append(f"| {g['question']} | {g['answer_key']} | {g['majority']} | {g['agreement']:.1f} | "
                     f"{g['answer_entropy']:.3f} | {g['distinct']} |")  # fmt: skip
    low, high = p["mi_difference_wrong_minus_right_ci95"]
    lines += ["", f"## bayeslora predict on {p['questions']} unlabelled questions (answers joined afterwards)", "",
              f"accuracy {100 * p['accuracy']:.1f} %; mean mutual information: right {p['mean_mi_right']:.5f}, "
              f"wrong {p['mean_mi_wrong']:.5f} (wrong − right, 95 % bootstrap interval [{low:.5f}, {high:.5f}]); "
              f"AUROC of MI telling wrong from right {p['auroc_mi_wrong_vs_right']:.3f}, of the predictive entropy "
              f"{p['auroc_entropy_wrong_vs_right']:.3f}.", "",
              f"## lm-eval ({options.samples} samples) and bayeslora eval on the same {lm['questions']} questions", "",
              "| harness | accuracy % |", "|---|---|",
              f"| lm-eval acc (sum log-likelihood) | {100 * lm['acc']:.1f} |",
              f"| lm-eval acc_norm (per byte) | {100 * lm['acc_norm']:.1f} |",
              f"| bayeslora eval, cloze sum | {100 * lm['bayeslora_eval_sum']['accuracy']:.1f} |",
              f"| bayeslora eval, cloze mean (the run's) | {100 * lm['bayeslora_eval_mean']['accuracy']:.1f} |",
              ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
