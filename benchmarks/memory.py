"""Memory and speed of one training step of an adapted linear layer at LLaMA-7B / -13B shapes.

For every shape (n = m = 4096 and 5120, r = 8) and sequence length (512 ... 4096), each method (PEFT's
LoRA, BLoB, Me-LoRA) runs in its own fresh subprocess: a frozen n×n linear layer with the adapter, an
input (1, T, n) that requires grad (as inside a network), one AdamW step. Measured side by side in one run:

* trainable parameters of the layer;
* peak memory of the step above the frozen base: the CPU allocator's live bytes, counted exactly by the
  PyTorch profiler (``profile_memory``: every allocation and free during the step), maximum over one
  forward + backward + optimizer step taken after a first step created the optimizer state. Everything
  alive before the step (frozen weight, input, adapter, optimizer state) is not counted; the
  allocator-independent count does not drift like the process's resident set does. Cross-checked by the
  bytes autograd saves for the backward pass;
* step time: the median of the timed steps of a subprocess; the subprocesses of all methods run in
  interleaved rounds (lora, blob, melora, lora, blob, ...) and the table gives the median over rounds,
  so that slow drift of a shared machine hits every method alike.

Also the analytic trainable-parameter count for LLaMA2-7B with q_proj, v_proj and lm_head adapted at
r = 8 (the model is built on the meta device, so nothing is allocated).

    python benchmarks/memory.py            # writes benchmarks/results/memory.json and memory.md (~20 min)
    python benchmarks/memory.py --quick    # one shape, two lengths, one round
    python benchmarks/memory.py --whole-model   # the whole model (benchmarks/model_memory.py): model_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _shared import aggregate_rounds, in_fresh_process, step_peak_and_time
from bayeslora.io import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
#: blob-reference: BLoB with its flipout signs in the input's dtype, the layout of the reference implementation
#: (Wang-ML-Lab/bayesian-peft), against which bayeslora's BLoB (int8 signs) is compared
METHODS = ("lora", "blob", "blob-reference", "melora")
#: What a row keeps from its first round (the same in every round).
MEMORY_KEYS = ("method", "width", "length", "rank", "trainable_params", "saved_for_backward_mib", "torch_threads")
TARGETS = {
    "melora_params_vs_blob": 0.68,
    "melora_peak_vs_blob": 0.9,
    "melora_peak_vs_lora": 1.02,
    "melora_time_vs_lora": 1.10,
}


def measure(method: str, width: int, length: int, rank: int, timed_steps: int = 7) -> dict:
    """One method at one shape, in this process (called in a fresh subprocess)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import bayeslora  # noqa: F401  (registers the tuners)
    from bayeslora.tuners import BlobConfig, MeLoraConfig

    torch.manual_seed(0)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(width, width, bias=False)

        def forward(self, x):
            return self.proj(x)

    configs = {
        "lora": LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]),
        "blob": BlobConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]),
        "blob-reference": BlobConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], flipout_signs="reference"),
        "melora": MeLoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]),
    }
    model = get_peft_model(One(), configs[method])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(1, length, width, requires_grad=True)
    target = torch.randn(1, length, width)

    def step():
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        loss = (model(x) - target).square().mean()
        loss.backward()
        optimizer.step()

    # saved-for-backward bytes of one forward (each storage counted once)
    saved: dict[int, int] = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (model(x) - target).square().mean()
    del loss
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    saved_bytes = sum(
        size for ptr, size in saved.items() if ptr not in frozen and ptr != x.untyped_storage().data_ptr()
    )

    peak_mib, step_time = step_peak_and_time(step, timed_steps)
    return {
        "method": method,
        "width": width,
        "length": length,
        "rank": rank,
        "trainable_params": sum(p.numel() for p in params),
        "peak_step_mib": peak_mib,
        "saved_for_backward_mib": saved_bytes / 2**20,
        "step_time_s": step_time,
        "torch_threads": torch.get_num_threads(),
    }


def llama2_7b_counts(rank: int = 8) -> dict[str, int]:
    """Trainable parameters of each method on LLaMA2-7B, q_proj / v_proj / lm_head at rank ``rank``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import bayeslora  # noqa: F401
    from bayeslora.tuners import BlobConfig, MeLoraConfig

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    targets = ["q_proj", "v_proj", "lm_head"]
    counts = {}
    for name, peft_config in (
        ("lora", LoraConfig(r=rank, lora_alpha=16, target_modules=targets)),
        ("blob", BlobConfig(r=rank, lora_alpha=16, target_modules=targets)),
        ("melora", MeLoraConfig(r=rank, lora_alpha=16, target_modules=targets)),
    ):
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = get_peft_model(model, peft_config)
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def run_subprocess(method: str, width: int, length: int, rank: int) -> dict:
    """:func:`measure` in a fresh Python process (nothing allocated by another method can linger)."""
    return in_fresh_process("memory", "measure", method, width, length, rank)


def ratios(rows: list[dict], counts: dict[str, int]) -> dict:
    """Me-LoRA against LoRA and BLoB at every shape, and whether each target holds everywhere."""
    per_shape = []
    for width, length in sorted({(r["width"], r["length"]) for r in rows}):
        same = {r["method"]: r for r in rows if r["width"] == width and r["length"] == length}
        me, lora, blob = same["melora"], same["lora"], same["blob"]
        per_shape.append(
            {
                "width": width,
                "length": length,
                "melora_peak_vs_blob": me["peak_step_mib"] / blob["peak_step_mib"],
                "melora_peak_vs_lora": me["peak_step_mib"] / lora["peak_step_mib"],
                "melora_time_vs_lora": me["step_time_s"] / lora["step_time_s"],
                "blob_time_vs_lora": blob["step_time_s"] / lora["step_time_s"],
                "blob_peak_vs_reference_layout": blob["peak_step_mib"] / same["blob-reference"]["peak_step_mib"],
                "blob_time_vs_reference_layout": blob["step_time_s"] / same["blob-reference"]["step_time_s"],
            }
        )
    worst = {
        key: max(s[key] for s in per_shape)
        for key in ("melora_peak_vs_blob", "melora_peak_vs_lora", "melora_time_vs_lora")
    }
    worst["melora_params_vs_blob"] = counts["melora"] / counts["blob"]
    return {"per_shape": per_shape, "worst": worst, "met": {k: worst[k] <= TARGETS[k] for k in TARGETS}}


def to_markdown(rows: list[dict], counts: dict[str, int], summary: dict) -> str:
    lines = [
        "# Memory and speed of one training step (benchmarks/memory.py)",
        "",
        "One adapted linear layer (frozen n×n weight, r = 8, α = 16, fp32, CPU, "
        f"{rows[0].get('torch_threads', '?')} threads), input (1, T, n) requiring grad, one AdamW step; each "
        f"method in a fresh process, {rows[0]['rounds']} interleaved round(s). Peak = the allocator's largest "
        "live bytes during the step above everything allocated before it (profiler count, exact); step time = "
        "median over rounds of each process's median step.",
        "",
        "| n | T | method | trainable | peak step MiB | saved for backward MiB | step ms | peak vs LoRA | "
        "peak vs BLoB | time vs LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = [r for r in rows if r["width"] == row["width"] and r["length"] == row["length"]]
        lora = next(r for r in same if r["method"] == "lora")
        blob = next(r for r in same if r["method"] == "blob")
        lines.append(
            f"| {row['width']} | {row['length']} | {row['method']} | {row['trainable_params']:,} | "
            f"{row['peak_step_mib']:.1f} | {row['saved_for_backward_mib']:.1f} | {1000 * row['step_time_s']:.1f} | "
            f"{row['peak_step_mib'] / lora['peak_step_mib']:.3f} | "
            f"{row['peak_step_mib'] / blob['peak_step_mib']:.3f} | "
            f"{row['step_time_s'] / lora['step_time_s']:.3f} |"
        )
    lines += [
        "",
        "Trainable parameters on LLaMA2-7B (q_proj, v_proj, lm_head; r = 8), counted on a meta-device model:",
        "",
        "| method | trainable | vs BLoB |",
        "|---|---|---|",
    ]
    for method in counts:
        lines.append(f"| {method} | {counts[method]:,} | {counts[method] / counts['blob']:.3f} |")
    lines += ["", "bayeslora's BLoB (int8 flipout signs) against the reference's layout (signs in the input's dtype):",
              "", "| n | T | peak vs reference layout | time vs reference layout |", "|---|---|---|---|"]  # fmt: skip
    for shape in summary["per_shape"]:
        lines.append(
            f"| {shape['width']} | {shape['length']} | {shape['blob_peak_vs_reference_layout']:.3f} | "
            f"{shape['blob_time_vs_reference_layout']:.3f} |"
        )
    lines += ["", "Targets (worst case over all shapes):", "", "| ratio | worst | target | met |", "|---|---|---|---|"]
    for key, limit in TARGETS.items():
        lines.append(f"| {key} | {summary['worst'][key]:.3f} | <= {limit} | {'yes' if summary['met'][key] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", type=int, default=[4096, 5120])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of subprocesses per shape.")
    parser.add_argument("--quick", action="store_true", help="n = 4096, T = 512 and 1024 only, one round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--whole-model", action="store_true", help="Whole models instead of one layer.")
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama7b-2"], help="With --whole-model.")
    parser.add_argument("--dtype", default="float32", help="The frozen base's dtype, with --whole-model.")
    parser.add_argument("--llama-tokens", type=int, default=512, help="Sequence length of llama7b-2.")
    parser.add_argument("--timed-steps", type=int, default=3, help="Timed steps per process, with --whole-model.")
    args = parser.parse_args(argv)
    if args.whole_model:
        import model_memory

        started = time.time()
        rows, summary = model_memory.run(
            args.models, args.rounds, args.dtype, args.rank, args.llama_tokens, args.timed_steps
        )
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        print(model_memory.write(args.out, rows, summary, settings))
        print(f"took {(time.time() - started) / 60:.1f} min")
        return 0
    if args.quick:
        args.widths, args.lengths, args.rounds = [4096], [512, 1024], 1
    started = time.time()
    rows = []
    for width in args.widths:
        for length in args.lengths:
            rounds: dict[str, list[dict]] = {m: [] for m in METHODS}
            for _ in range(args.rounds):
                for method in METHODS:
                    rounds[method].append(run_subprocess(method, width, length, args.rank))
            for method in METHODS:
                rows.append(aggregate_rounds(rounds[method], MEMORY_KEYS))
                print(json.dumps(rows[-1]), flush=True)
    counts = llama2_7b_counts(args.rank)
    summary = ratios(rows, counts)
    write_json_atomic(
        args.out / "memory.json",
        {"steps": rows, "llama2_7b_trainable": counts, "ratios": summary, "targets": TARGETS},
    )
    table = to_markdown(rows, counts, summary)
    write_text_atomic(args.out / "memory.md", table)
    print(table)
    print(f"took {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
