"""Evaluation at scale: peak memory and throughput of a zero-shot MMLU evaluation as the number of questions grows.

Each size runs in its own fresh subprocess (``bayeslora.evaluate`` of the packaged SmolLM2, cloze scoring,
MMLU test questions in their seeded order), which reports its peak resident set (``ru_maxrss``) and the
resident set right after the model is loaded. Evaluation streams batch by batch, keeping only the N×C class
probabilities, so the peak above the loaded model should not grow with N; the table shows whether it does.

    python benchmarks/eval_memory.py                            # 250, 1000, 4000 and all 14,042 questions (~1.5 h)
    python benchmarks/eval_memory.py --sizes 250 1000 --num-layers 2   # quicker: the model cut to 2 blocks
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bayeslora.io import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = r"""
import json, resource, sys, time
import bayeslora as bl
from bayeslora.pipeline.common import load_base
from bayeslora.config import make_config
from bayeslora.tasks import load_task

options = json.loads(sys.argv[1])
config = make_config(model=options["model"], task="mmlu", num_layers=options["num_layers"])
load_base(config, load_task("mmlu"), progress=False)  # warms the caches; its resident set is the baseline
loaded_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
metrics = bl.evaluate(model=options["model"], task="mmlu", limit=options["limit"], num_layers=options["num_layers"],
                      eval_batch_size=options["batch_size"], output_dir=options["out"], progress=False)
print(json.dumps({
    "questions": metrics["n_examples"], "accuracy": metrics["accuracy"],
    "seconds": time.perf_counter() - started, "loaded_mib": loaded_mib,
    "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def measure(model: str, limit: int | None, num_layers: int | None, batch_size: int) -> dict:
    """One evaluation of ``limit`` MMLU questions (None: all) in a fresh process; what it reports."""
    with tempfile.TemporaryDirectory() as out:
        options = {"model": model, "limit": limit, "num_layers": num_layers, "batch_size": batch_size, "out": out}
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(options)], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"evaluation of {limit} questions failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """Markdown: questions, peak resident set, its growth over the loaded model, time per question."""
    lines = [
        "| questions | peak RSS (MiB) | loaded model (MiB) | peak − loaded (MiB) | s / question | accuracy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['questions']:,} | {r['peak_mib']:.0f} | {r['loaded_mib']:.0f} | "
            f"{r['peak_mib'] - r['loaded_mib']:.0f} | {r['seconds'] / r['questions']:.3f} | {r['accuracy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", nargs="+", default=["250", "1000", "4000", "all"], help="Question counts, or all.")
    parser.add_argument("--num-layers", type=int, default=None, help="Cut the model to N blocks (quicker).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tag", default="default")
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes:
        limit = None if size == "all" else int(size)
        rows.append({"limit": limit, **measure(args.model, limit, args.num_layers, args.batch_size)})
        print(table(rows), flush=True)
        settings = {k: v for k, v in vars(args).items()}
        write_json_atomic(RESULTS / f"eval_memory-{args.tag}.json", {"settings": settings, "results": rows})
    write_text_atomic(RESULTS / f"eval_memory-{args.tag}.md", table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
