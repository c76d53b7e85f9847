"""Memory and speed of one training step of an adapted linear layer at LLaMA-7B / -13B shapes.

For every shape (n = m = 4096 and 5120, r = 8) and sequence length (512 ... 4096), each method (PEFT's
LoRA, BLoB, Me-LoRA) runs in its own fresh subprocess: a frozen n×n linear layer with the adapter, an
input that requires grad (as inside a network), one AdamW step. Measured side by side in one run:

* trainable parameters of the layer;
* peak memory of the step above the frozen base: the process's peak resident set (VmHWM) during
  forward + backward + optimizer step, minus the resident set just before it (base weight and input
  already allocated); cross-checked by the bytes autograd saves for the backward pass;
* step time: median of 5 timed steps after 2 warm-up steps.

Also the analytic trainable-parameter count for LLaMA2-7B with q_proj, v_proj and lm_head adapted at
r = 8 (the model is built on the meta device, so nothing is allocated).

    python benchmarks/memory.py            # writes benchmarks/results/memory.json and memory.md
    python benchmarks/memory.py --quick    # one shape, two lengths
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bayeslora.io import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("lora", "blob", "melora")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def measure(method: str, width: int, length: int, rank: int) -> dict:
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

    step()  # optimizer state exists from here on, like in any step after the first
    _reset_peak()
    before = _rss_kib("VmRSS")
    step()
    peak = _rss_kib("VmHWM")
    step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "method": method,
        "width": width,
        "length": length,
        "rank": rank,
        "trainable_params": sum(p.numel() for p in params),
        "peak_step_mib": (peak - before) / 1024,
        "saved_for_backward_mib": saved_bytes / 2**20,
        "step_time_s": statistics.median(times),
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
    here = str(Path(__file__).parent)
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); from memory import measure; "
        f"print(json.dumps(measure({method!r}, {width}, {length}, {rank})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def to_markdown(rows: list[dict], counts: dict[str, int]) -> str:
    lines = [
        "# Memory and speed of one training step (benchmarks/memory.py)",
        "",
        "One adapted linear layer (frozen n×n weight, r = 8, fp32, CPU), input (1, T, n) requiring grad, one "
        "AdamW step; each method in a fresh process. Peak = VmHWM during the step minus RSS before it.",
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
            f"{row['peak_step_mib'] / lora['peak_step_mib']:.2f} | "
            f"{row['peak_step_mib'] / blob['peak_step_mib']:.2f} | "
            f"{row['step_time_s'] / lora['step_time_s']:.2f} |"
        )
    lines += [
        "",
        "Trainable parameters on LLaMA2-7B (q_proj, v_proj, lm_head; r = 8), counted on a meta-device model:",
        "",
        "| method | trainable | vs BLoB |",
        "|---|---|---|",
    ]
    for method in METHODS:
        lines.append(f"| {method} | {counts[method]:,} | {counts[method] / counts['blob']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", type=int, default=[4096, 5120])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="n = 4096, T = 512 and 1024 only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.lengths = [4096], [512, 1024]
    rows = []
    for width in args.widths:
        for length in args.lengths:
            for method in METHODS:
                row = run_subprocess(method, width, length, args.rank)
                print(json.dumps(row), flush=True)
                rows.append(row)
    counts = llama2_7b_counts(args.rank)
    print(counts)
    write_json_atomic(args.out / "memory.json", {"steps": rows, "llama2_7b_trainable": counts})
    table = to_markdown(rows, counts)
    write_text_atomic(args.out / "memory.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
