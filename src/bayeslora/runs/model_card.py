"""The model card (``README.md``) of a run's adapter: what was trained (method, base model, task), how well it did
(every evaluation of the run), and how to load it with and without bayeslora."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import make_config
from ..io import read_json, write_text_atomic
from ..methods import get_method
from ..models import MODEL_ALIASES, hub_name
from .layout import ADAPTER_DIR, EVAL_DIR, TRAIN_SUMMARY, read_run_config

CARD_FILE = "README.md"

_METRICS = (("accuracy", "accuracy", 100, "{:.1f}"), ("ece", "ECE", 100, "{:.1f}"), ("nll", "NLL", 1, "{:.3f}"),
            ("brier", "Brier", 1, "{:.3f}"), ("token_nll", "token NLL", 1, "{:.3f}"),
            ("perplexity", "perplexity", 1, "{:.2f}"))  # fmt: skip


def _results_table(evaluations: list[dict[str, Any]]) -> str:
    if not evaluations:
        return "No evaluation was run.\n"
    shown = [m for m in _METRICS if any(m[0] in record for record in evaluations)]
    lines = [
        "| task | samples | " + " | ".join(label for _, label, _, _ in shown) + " |",
        "|---" * (2 + len(shown)) + "|",
    ]
    for record in evaluations:
        cells = [str(record.get("task")), str(record.get("n_samples", ""))]
        cells += [form.format(scale * record[key]) if key in record else "" for key, _, scale, form in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + "\n\nAccuracy and ECE (15 bins) in %; NLL (per question, or per completion token), ECE and Brier: lower "
        "is better.\n"
    )


def _base_note(model: str) -> str:
    alias = MODEL_ALIASES.get(model)
    if alias is None:
        return ""
    return (
        f"The base is bayeslora's packaged `{model}`: {alias.description}. Its Hugging Face id above names the model "
        f"it was converted from; the weights bayeslora trained on are its packaged copy (for SmolLM2 a 4-bit GGUF "
        f"dequantized to float), so other copies of the base give slightly different outputs.\n\n"
    )


def model_card(run: str | Path) -> str:
    """The model card of the run in ``run``, from its ``config.yaml``, ``train_summary.json`` and evaluations."""
    run = Path(run)
    config = read_run_config(run)
    summary = read_json(run / TRAIN_SUMMARY) if (run / TRAIN_SUMMARY).is_file() else {}
    evaluations = [read_json(path) for path in sorted((run / EVAL_DIR).glob("*/metrics.json"))]
    method = get_method(config["method"])
    base = hub_name(config["model"])
    bayesian = method.is_stochastic(method.resolve(make_config(**config)))
    adapter_types = "bayeslora" if method.peft_type in ("MELORA", "BLOB", "BLORA") else "peft"
    loading = (
        "```python\nimport bayeslora  # registers Me-LoRA, BLoB and B-LoRA with PEFT\nfrom peft import PeftModel\n"
        f'model = PeftModel.from_pretrained(base_model, "{ADAPTER_DIR}")\n```\n\n'
        "Without bayeslora, `bayeslora export --run RUN --to lora --output-dir OUT` writes a plain PEFT LoRA adapter "
        "(the posterior mean; B-LoRA truncated to its learned ranks) that any PEFT loads.\n"
        if adapter_types == "bayeslora"
        else "```python\nfrom peft import PeftModel\n"
        f'model = PeftModel.from_pretrained(base_model, "{ADAPTER_DIR}")\n```\n'
    )
    predictive = (
        "Predictions average posterior samples: `bayeslora eval --run RUN --samples N`, `bayeslora predict`, "
        "`bayeslora generate`, or in Python `bayeslora.sampling()` / `bayeslora.frozen_samples()` around the forward "
        "pass (`model.eval()` alone predicts with the posterior mean).\n\n"
        if bayesian
        else ""
    )
    version = summary.get("versions", {}).get("bayeslora", "")
    what = (
        f"**Method**: `{config['method']}`: {method.description}. Rank {config.get('rank')}, alpha "
        f"{config.get('alpha')}, adapted modules {', '.join(config.get('target_modules') or [])}. Trained with "
        f"bayeslora {version} on {summary.get('train_examples', '?')} examples of `{config['task']}` for "
        f"{summary.get('steps', '?')} optimizer steps (seed {config.get('seed')})."
    )
    return f"""---
library_name: peft
base_model: {base}
tags:
- bayeslora
- {config["method"]}
- peft
---

# {config["method"]} adapter of {base}, trained on {config["task"]}

{what}

{_base_note(config["model"])}## Results

{_results_table(evaluations)}
## How to load

With bayeslora: `bayeslora eval --run RUN`, or in Python

{loading}
{predictive}The run's `config.yaml` holds every option it was trained with.
"""


def write_model_card(run: str | Path) -> Path:
    """Write the model card into the run's adapter directory (atomically); returns its path."""
    path = Path(run) / ADAPTER_DIR / CARD_FILE
    write_text_atomic(path, model_card(run))
    return path


def refresh_model_card(run: str | Path) -> Path | None:
    """Rewrite the model card of a run whose evaluations changed (a later ``bayeslora eval`` or ``calibrate`` into
    the run), if the run has one (runs trained before model cards existed keep having none); returns its path."""
    if not (Path(run) / ADAPTER_DIR / CARD_FILE).is_file():
        return None
    return write_model_card(run)
