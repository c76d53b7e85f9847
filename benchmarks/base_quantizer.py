"""What B-LoRA's base quantizer does to a frozen language model before any training (``--quantize-base``).

The frozen W0 cannot adapt to its quantizer, so the quantizer's design is measured on the untrained adapter
(B = 0, the model itself): how far it moves the packaged SmolLM2's next-token distributions, KL(16-bit ‖
quantized) averaged over the answer-text positions of ARC-Easy evaluation questions (every choice), with

* every adapted W0 rounded to b bits with one range per output channel (B-LoRA's) or one per tensor
  (``granularity``);
* the base gates *sampled* as in B-LoRA's training phase (initial logits, hard-concrete samples) over a
  floor of 2, 4 or 8 bits (``--base-min-bits``), for W0, the activations x, or both (``floor``).

In both the activation ranges are first set from a warm-up pass over other questions, as training sets them.

    python benchmarks/base_quantizer.py                   # 48 questions (~15 min on 2 cores)
    python benchmarks/base_quantizer.py --questions 16    # quicker
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bayeslora.io import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
MODEL, TASK, BATCH = "smollm2-135m", "arc-easy", 8
INITIAL_LOGIT = 3.0  # --bit-gate-init


def _prepared(questions: int, base_min_bits: int):
    """``(model, scorer, evaluation examples)``: an untrained base-quantized B-LoRA on SmolLM2 whose activation
    ranges were set from a warm-up pass over other questions, as training sets them."""
    import bayeslora as bl
    from bayeslora.evaluation import eval_examples
    from bayeslora.pipeline.common import build_scorer, load_base
    from bayeslora.runs.adapters import attach_adapter

    config = bl.make_config(model=MODEL, task=TASK, method="blora", quantize_base=True, base_min_bits=base_min_bits)
    task = bl.load_task(TASK)
    model, tokenizer = load_base(config, task, progress=False)
    model, _ = attach_adapter(model, config, task)
    scorer = build_scorer(task, tokenizer, config)
    examples = eval_examples(task, 2 * questions)
    model.train()
    _set_phase(model, "open")
    _answer_log_probs(model, scorer, examples[questions:])  # the inputs seen set the activation ranges
    for layer in _blora_layers(model):
        layer.calibrate_ranges("default")
    return model, scorer, examples[:questions]


@torch.no_grad()
def _answer_log_probs(model, scorer, examples: list, seed: int = 0) -> list[torch.Tensor]:
    """Next-token log-probabilities (K, V) at every answer-text position of every choice, batch by batch, as
    the cloze scorer computes them (one draw of every sampled gate per batch, seeded)."""
    from bayeslora.tuners.sampling import rows_of_examples

    torch.manual_seed(seed)
    found = []
    for start in range(0, len(examples), BATCH):
        batch = scorer.collate(examples[start : start + BATCH])
        mask = torch.zeros(batch["segment_mask"].shape)
        mask.masked_fill_(~batch["segment_mask"], torch.finfo(mask.dtype).min)  # (B, 1, T, T)
        with rows_of_examples(batch["sequence_example"]):
            logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
        found.append(logits[batch["target_row"], batch["target_position"]].float().log_softmax(-1))  # (K, V)
    return found


def _damage(model, scorer, examples, reference: list[torch.Tensor]) -> float:
    """Mean KL(p_16-bit ‖ p_quantized) over the answer-text positions, in nats: how far quantization moves the
    model's next-token distributions (0 for no change)."""
    quantized = _answer_log_probs(model, scorer, examples)
    kl = [(ref.exp() * (ref - q)).sum(-1) for ref, q in zip(reference, quantized, strict=True)]
    return float(torch.cat(kl).mean())


def _blora_layers(model) -> list:
    from bayeslora.tuners.blora.layer import BLoraLayer

    return [m for m in model.modules() if isinstance(m, BLoraLayer)]


def _set_phase(model, phase: str) -> None:
    for layer in _blora_layers(model):
        layer.phase = phase


@torch.no_grad()
def _set_gates(model, bits: dict[str, int | None]) -> None:
    """Bit-width gates of tensor t: on up to ``bits[t]`` and off above, or at their initial logits if None."""
    from bayeslora.tuners.blora.quantizer import bit_gate_widths

    for layer in _blora_layers(model):
        for tensor, logits in (("W", layer.blora_W_bits["default"]), ("x", layer.blora_x_bits["default"])):
            wanted = bits.get(tensor, 16)
            if wanted is None:
                logits.fill_(INITIAL_LOGIT)
                continue
            widths = bit_gate_widths(layer.base_max_bits["default"], layer.base_min_bits["default"])
            logits.copy_(torch.tensor([20.0 if width <= wanted else -20.0 for width in widths]))


def granularity(questions: int) -> list[dict]:
    """NLL with every adapted W0 at b bits (evaluation-time rounding, x at 16 bits), B-LoRA's range per output
    channel against one range per tensor (every row's range set to the tensor's [min, max])."""
    model, scorer, examples = _prepared(questions, base_min_bits=2)
    model.eval()
    _set_phase(model, "open")
    reference = _answer_log_probs(model, scorer, examples)
    _set_phase(model, "fixed")
    layers = _blora_layers(model)
    per_row = [layer.blora_W_range["default"].detach().clone() for layer in layers]
    rows = []
    for bits in (16, 8, 4, 2):
        _set_gates(model, {"W": bits})
        for per_channel in (False, True):
            with torch.no_grad():
                for layer, bounds in zip(layers, per_row, strict=True):
                    whole = torch.stack([bounds[0].min().expand_as(bounds[0]), bounds[1].max().expand_as(bounds[1])])
                    layer.blora_W_range["default"].copy_(bounds if per_channel else whole)
            kl = _damage(model, scorer, examples, reference)
            rows.append({"bits": bits, "per_channel": per_channel, "kl": kl})
            print(f"W0 at {bits} bits, {'per channel' if per_channel else 'per tensor'}: KL {kl:.4f}", flush=True)
    return rows


def floor(questions: int) -> list[dict]:
    """NLL with the base gates of W0, x or both sampled at their initial logits over each floor (the others
    surely on, at 16 bits), as in the first step of B-LoRA's gate training."""
    rows = []
    for base_min_bits in (2, 4, 8):
        model, scorer, examples = _prepared(questions, base_min_bits)
        reference = _answer_log_probs(model, scorer, examples)  # still open: the 16-bit model
        _set_phase(model, "sample")
        for sampled in ((), ("W",), ("x",), ("W", "x")):
            _set_gates(model, {tensor: None for tensor in sampled})
            kl = _damage(model, scorer, examples, reference)
            rows.append({"base_min_bits": base_min_bits, "sampled": list(sampled), "kl": kl})
            print(f"floor {base_min_bits} bits, sampled {'+'.join(sampled) or 'none'}: KL {kl:.4f}", flush=True)
    return rows


def markdown(result: dict) -> str:
    """Both tables."""
    lines = [
        "# B-LoRA's base quantizer on the untrained SmolLM2 (`python benchmarks/base_quantizer.py`)",
        "",
        f"Mean KL(16-bit ‖ quantized), nats, of the next-token distributions at the answer-text positions (all "
        f"choices) of {result['questions']} ARC-Easy evaluation questions; adapter B = 0.",
        "",
        "## W0 rounded to b bits (min-max range)",
        "",
        "| W0 bits | per tensor | per output channel |",
        "|---|---|---|",
    ]
    by = {(r["bits"], r["per_channel"]): r["kl"] for r in result["granularity"]}
    lines += [
        f"| {b} | {by[b, False]:.4f} | {by[b, True]:.4f} |"
        for b in sorted({r["bits"] for r in result["granularity"]}, reverse=True)
    ]
    lines += [
        "",
        "## Gates sampled over a floor (initial logits; activation ranges from a warm-up pass)",
        "",
        "| floor (bits) | nothing sampled | W0 sampled | x sampled | both |",
        "|---|---|---|---|---|",
    ]
    for base_min_bits in sorted({r["base_min_bits"] for r in result["floor"]}):
        cells = [f"{r['kl']:.4f}" for r in result["floor"] if r["base_min_bits"] == base_min_bits]
        lines.append(f"| {base_min_bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=48, help="ARC-Easy evaluation questions (default 48).")
    args = parser.parse_args()
    result = {"questions": args.questions, "granularity": granularity(args.questions), "floor": floor(args.questions)}
    write_json_atomic(RESULTS / "base_quantizer.json", result)
    write_text_atomic(RESULTS / "base_quantizer.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
