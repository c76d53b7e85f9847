"""Memory and speed of one training step of a whole adapted model (``python benchmarks/memory.py --whole-model``).

Two models, each method (PEFT's LoRA, BLoB, BLoB with the reference's flipout-sign layout, Me-LoRA; r = 8, α = 16 on
q_proj, v_proj and lm_head) in its own fresh subprocess, interleaved rounds:

* ``smollm2``: the packaged SmolLM2-135M, one training batch of ARC-Easy questions under cloze scoring (the
  benchmarks' setting: 4 questions, their choices as continuations of one shared context each);
* ``llama7b-2``: two blocks at LLaMA-7B width (hidden 4096, MLP 11008, 32 heads, vocabulary 32,000), random
  weights, one sequence of ``--llama-tokens`` random tokens, next-token loss on every position.

The loss is the training objective of each method: the NLL, plus KL/N_train (N_train = 320) for the Bayesian
ones. Measured after a first step created the optimizer state (AdamW): the exact allocator peak of one step above
everything alive before it (:class:`bayeslora.system.AllocationPeak`), and the median time of the timed steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from _shared import aggregate_rounds, in_fresh_process, step_peak_and_time

METHODS = ("lora", "blob", "blob-reference", "melora")
MODELS = ("smollm2", "llama7b-2")
TARGETS = ["q_proj", "v_proj", "lm_head"]
N_TRAIN = 320
QUESTIONS = 4


def _adapter_config(method: str, rank: int):
    from peft import LoraConfig

    from bayeslora.tuners import BlobConfig, MeLoraConfig

    common = {"r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS}
    return {
        "lora": lambda: LoraConfig(**common),
        "blob": lambda: BlobConfig(**common),
        "blob-reference": lambda: BlobConfig(**common, flipout_signs="reference"),
        "melora": lambda: MeLoraConfig(**common),
    }[method]()


def _model_and_loss(model_name: str, dtype: str, llama_tokens: int):
    """``(model, loss(model) -> Tensor)`` for one of :data:`MODELS`."""
    import torch

    import bayeslora as bl

    torch.manual_seed(0)
    if model_name == "smollm2":
        model, tokenizer = bl.load_model("smollm2-135m", dtype=dtype, progress=False)
        task = bl.load_task("arc-easy")
        scorer = bl.make_scorer(task, tokenizer)
        batch = scorer.collate(task.split("train")[:QUESTIONS])
        return model, lambda m: scorer.training_loss(m, batch)[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        torch_dtype=dtype,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    tokens = torch.randint(0, 32000, (1, llama_tokens))
    return model, lambda m: m(input_ids=tokens, labels=tokens).loss


def measure(method: str, model_name: str, dtype: str, rank: int, llama_tokens: int, timed_steps: int) -> dict:
    """One method on one model, in this process (called in a fresh subprocess)."""
    import torch
    from peft import get_peft_model

    from bayeslora.methods.variational import model_kl

    base, nll = _model_and_loss(model_name, dtype, llama_tokens)
    model = get_peft_model(base, _adapter_config(method, rank))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    bayesian = method != "lora"

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nll(model)
        if bayesian:
            loss = loss + model_kl(model).to(loss.dtype) / N_TRAIN
        loss.backward()
        optimizer.step()

    peak_mib, step_time = step_peak_and_time(step, timed_steps)
    return {
        "method": method,
        "model": model_name,
        "dtype": dtype,
        "trainable_params": sum(p.numel() for p in params),
        "peak_step_mib": peak_mib,
        "step_time_s": step_time,
        "torch_threads": torch.get_num_threads(),
    }


def run_subprocess(method: str, model_name: str, dtype: str, rank: int, llama_tokens: int, timed_steps: int) -> dict:
    """:func:`measure` in a fresh Python process."""
    return in_fresh_process("model_memory", "measure", method, model_name, dtype, rank, llama_tokens, timed_steps)


def ratios(rows: list[dict]) -> list[dict]:
    """Per model: Me-LoRA against LoRA and BLoB, bayeslora's BLoB against the reference's layout."""
    out = []
    for model_name in dict.fromkeys(r["model"] for r in rows):
        same = {r["method"]: r for r in rows if r["model"] == model_name}
        me, lora, blob, reference = same["melora"], same["lora"], same["blob"], same["blob-reference"]
        out.append(
            {
                "model": model_name,
                "melora_peak_vs_lora": me["peak_step_mib"] / lora["peak_step_mib"],
                "melora_peak_vs_blob": me["peak_step_mib"] / blob["peak_step_mib"],
                "melora_time_vs_lora": me["step_time_s"] / lora["step_time_s"],
                "blob_peak_vs_reference_layout": blob["peak_step_mib"] / reference["peak_step_mib"],
                "blob_time_vs_reference_layout": blob["step_time_s"] / reference["step_time_s"],
            }
        )
    return out


def to_markdown(rows: list[dict], summary: list[dict]) -> str:
    lines = [
        "# Memory and speed of one training step of the whole model (benchmarks/memory.py --whole-model)",
        "",
        f"q_proj, v_proj and lm_head adapted (r = 8, α = 16), {rows[0]['dtype']}, CPU, {rows[0]['torch_threads']} "
        f"threads, each method in a fresh process, {rows[0]['rounds']} interleaved round(s). smollm2: the packaged "
        f"SmolLM2-135M on {QUESTIONS} ARC-Easy questions (cloze); llama7b-2: two LLaMA-7B-wide blocks, random "
        "weights, one random sequence. Peak = the allocator's largest live bytes during one AdamW step above "
        "everything alive before it (exact profiler count).",
        "",
        "| model | method | trainable | peak step MiB | step s | peak vs LoRA | peak vs BLoB | time vs LoRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = {r["method"]: r for r in rows if r["model"] == row["model"]}
        lines.append(
            f"| {row['model']} | {row['method']} | {row['trainable_params']:,} | {row['peak_step_mib']:.1f} | "
            f"{row['step_time_s']:.2f} | {row['peak_step_mib'] / same['lora']['peak_step_mib']:.3f} | "
            f"{row['peak_step_mib'] / same['blob']['peak_step_mib']:.3f} | "
            f"{row['step_time_s'] / same['lora']['step_time_s']:.3f} |"
        )
    lines += [
        "",
        "| model | Me-LoRA peak vs LoRA | Me-LoRA peak vs BLoB | BLoB peak vs reference layout | "
        "BLoB time vs reference |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['melora_peak_vs_lora']:.3f} | {s['melora_peak_vs_blob']:.3f} | "
            f"{s['blob_peak_vs_reference_layout']:.3f} | {s['blob_time_vs_reference_layout']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run(
    models: list[str], rounds: int, dtype: str, rank: int, llama_tokens: int, timed_steps: int
) -> tuple[list[dict], list[dict]]:
    """Every method on every model in interleaved rounds of fresh subprocesses; ``(rows, ratios)``."""
    rows = []
    for model_name in models:
        per_method: dict[str, list[dict]] = {m: [] for m in METHODS}
        for _ in range(rounds):
            for method in METHODS:
                per_method[method].append(run_subprocess(method, model_name, dtype, rank, llama_tokens, timed_steps))
                print(json.dumps(per_method[method][-1]), flush=True)
        rows += [
            aggregate_rounds(per_method[m], ("method", "model", "dtype", "trainable_params", "torch_threads"))
            for m in METHODS
        ]
    return rows, ratios(rows)


def write(out: Path, rows: list[dict], summary: list[dict], settings: dict[str, Any]) -> str:
    """benchmarks/results/model_memory.{json,md}; returns the markdown."""
    from bayeslora.io import write_json_atomic, write_text_atomic

    write_json_atomic(out / "model_memory.json", {"settings": settings, "steps": rows, "ratios": summary})
    table = to_markdown(rows, summary)
    write_text_atomic(out / "model_memory.md", table)
    return table
