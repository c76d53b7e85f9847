"""A model type for lm-evaluation-harness: any of lm-eval's tasks evaluates a bayeslora run, Bayesian adapters
through their posterior predictive.

::

    bayeslora lm-eval --model bayeslora --model_args run=runs/arc-melora,samples=10 --tasks arc_easy
    # or, in Python, after `import bayeslora.lm_eval`:  lm_eval.simple_evaluate(model="bayeslora", ...)

A log-likelihood request ``log p(continuation | context)`` is answered with the probability averaged over N posterior
samples, ``log p̄ = log (1/N) Σ_s p(continuation | context, θ_s) = logsumexp_s ℓ_s − log N``: each θ_s is ONE whole
model (one weight sample shared by every request, drawn once and frozen), run over all requests as lm-eval batches
them; an ensemble's θ_s are its members, MC dropout's its dropout masks (new per forward pass). ``is_greedy`` is the
majority of the samples' verdicts. ``samples=0`` evaluates the posterior mean (what ``bayeslora export --to lora``
writes); generation requests always use the posterior mean. Rolling log-likelihoods (perplexity tasks) average per
window of lm-eval's.

lm-eval 0.4.13 finds a third-party model only once its module is imported (``bayeslora lm-eval`` does that); the
package also declares the ``lm_eval.models`` entry point that later releases read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .evaluation.predictive import adapter_dropout, using_adapter
from .methods import get_method
from .pipeline.common import load_run
from .pipeline.evaluate import resolve_samples
from .tuners.sampling import frozen_samples, posterior_mean, rows_of_examples, sampling
from .tuners.trunk import sampled_layers


@register_model("bayeslora")
class BayesLoraLM(HFLM):
    """lm-eval's Hugging Face causal LM, holding a bayeslora run's model and answering log-likelihood requests with
    its posterior predictive (see the module docstring).

    Args (``--model_args``):
        run: the run directory written by ``bayeslora train``.
        samples: posterior samples (default: the method's; 0: the posterior mean).
        dtype: the base model's dtype (default: the run's).
        softmax_dtype: the dtype of the log-softmax (default float32).
        force_base: load the adapter even onto another base model than it was trained on.
        sample_layers: ``last:K`` samples the posterior of the top K blocks and the head only, its mean below
            (default: the run's; see ``--sample-layers``).
        Others (``batch_size``, ``max_length``, ...) as lm-eval's ``hf`` model.
    """

    def __init__(
        self,
        run: str,
        samples: int | None = None,
        dtype: str | None = None,
        force_base: bool = False,
        sample_layers: str | None = None,
        **kwargs: Any,
    ) -> None:
        options = {"dtype": dtype} if dtype else {}
        if sample_layers:  # the posterior sampled in the top K blocks and the head only (--sample-layers)
            options["sample_layers"] = sample_layers
        loaded = load_run(run, progress=False, force_base=force_base, **options)
        if loaded.task.kind == "classification":
            raise ValueError(f"{run} was trained on a classification task: lm-eval needs a causal language model")
        config = loaded.config
        method = get_method(config.method)
        n_samples = resolve_samples(config, samples)
        predictive = method.predictive(config, n_samples, Path(run))
        if "sampler" in predictive:
            raise ValueError(
                f"--method {config.method} predicts through its own class-probability sampler, which lm-eval's "
                f"log-likelihood requests cannot use"
            )
        kwargs.pop("pretrained", None)
        # log-probabilities in float32 as bayeslora's own scorers compute them: with a bf16 base (what dtype=auto picks
        # on CPUs with bf16 units, and on GPUs) lm-eval would otherwise take the log-softmax in bf16, whose 8-bit
        # mantissa rounds a continuation's log-likelihood to steps of 1/16 nat and more
        kwargs.setdefault("softmax_dtype", "float32")
        model = loaded.model
        # HFLM re-ties the input and output embeddings; loading tied them already, and an adapted lm_head (a wrapper
        # whose `weight` is its base layer's) cannot be re-tied by assignment
        model.tie_weights = lambda *args, **kw: None
        try:
            super().__init__(pretrained=model, tokenizer=loaded.tokenizer, backend="causal", **kwargs)
        finally:
            del model.tie_weights
        self.run_config = config
        self.members: list[str] = list(predictive.get("members", ()))
        self.dropout = bool(predictive.get("dropout", False))
        self.sample_layers = predictive.get("sample_layers", "all")
        self.samples = n_samples if method.is_stochastic(config) and not self.members else 0
        self._one_sample_per_pass = False
        torch.manual_seed(config.seed)  # the same posterior samples for the same run

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """The logits of a batch; while one posterior sample is in force, every row belongs to it."""
        if not self._one_sample_per_pass:
            return super()._model_call(inps, attn_mask, labels)
        with rows_of_examples(torch.zeros(inps.shape[0], dtype=torch.long, device=inps.device)):
            return super()._model_call(inps, attn_mask, labels)

    @contextmanager
    def _posterior_sample(self, index: int) -> Iterator[None]:
        """Within the block the model is posterior sample ``index``: an ensemble member, a frozen weight sample shared
        by every row of every pass, or (MC dropout) new dropout masks at every pass."""
        with ExitStack() as stack:
            if self.members:
                stack.enter_context(using_adapter(self.model, self.members[index]))
            elif self.dropout:
                stack.enter_context(sampling())
                stack.enter_context(adapter_dropout(self.model))
            else:
                stack.enter_context(sampled_layers(self.model, self.sample_layers))
                stack.enter_context(frozen_samples())
                self._one_sample_per_pass = True
                stack.callback(setattr, self, "_one_sample_per_pass", False)
            yield

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """``(log p̄(continuation | context), is_greedy)`` per request over the posterior samples."""
        draws = len(self.members) or self.samples
        if draws == 0:
            with posterior_mean():
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        per_sample = []
        for index in range(draws):
            with self._posterior_sample(index):
                quiet = disable_tqdm or index > 0
                per_sample.append(super()._loglikelihood_tokens(requests, disable_tqdm=quiet, override_bs=override_bs))
        combined = []
        for answers in zip(*per_sample, strict=True):
            logs = torch.tensor([float(ll) for ll, _ in answers], dtype=torch.float64)
            greedy = sum(bool(g) for _, g in answers)
            combined.append((float(torch.logsumexp(logs, 0)) - math.log(draws), 2 * greedy > draws))
        return combined

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Generation with the posterior mean (one answer per request, as lm-eval scores it)."""
        with posterior_mean():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)


def local_multiple_choice_task(name: str, data_file: str | Path) -> str:
    """An lm-eval task YAML (for ``--include_path``) over a local JSONL file of bayeslora's multiple-choice schema
    (``question``, ``choices``, ``answer``), prompted as bayeslora's cloze scoring does (``Question: ...\nAnswer:``),
    scored by ``acc`` (summed log-likelihood) and ``acc_norm`` (per byte): an lm-eval task that needs no network."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {Path(data_file).resolve()}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def main(argv: list[str]) -> int:
    """``bayeslora lm-eval ARGS``: lm-eval's command line with the ``bayeslora`` model type registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


__all__ = ["BayesLoraLM", "local_multiple_choice_task", "main"]
