"""``bayesian_layers="last:K"``: the posterior in the top K blocks and the head only, deterministic adapters below,
and N posterior samples that share one pass through those deterministic blocks."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaForCausalLM

import bayeslora  # noqa: F401  (registers the tuners)
from _toy_models import TwoLayers, tiny_llama_config
from bayeslora.config import RunConfig
from bayeslora.evaluation.predictive import predict_batch
from bayeslora.evaluation.scoring import ClozeScorer
from bayeslora.methods.variational import model_kl
from bayeslora.tasks import MultipleChoiceExample
from bayeslora.tuners import BlobConfig, BlobLayer, MeLoraConfig, MeLoraLayer
from bayeslora.tuners.blocks import parse_bayesian_layers
from bayeslora.tuners.sampling import posterior_mean
from bayeslora.tuners.trunk import first_bayesian_block

TARGETS = ["q_proj", "v_proj", "lm_head"]
CONFIGS = {"melora": MeLoraConfig, "blob": BlobConfig}


def four_block_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab, num_hidden_layers=4)).eval()


def adapted(method: str, spec: str, vocab: int = 64):
    """A 4-block Llama with ``method`` on q, v and the LM head, and every adapter parameter randomised (so that
    every layer's adapter, mean and spread, acts)."""
    model = get_peft_model(four_block_llama(vocab), CONFIGS[method](r=4, target_modules=TARGETS, bayesian_layers=spec))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3 + (0.3 if "rho" in name or "_g" in name else 0.0))
    return model.eval()


def layers(model) -> dict[str, MeLoraLayer | BlobLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MeLoraLayer | BlobLayer)}


@pytest.mark.parametrize("method", CONFIGS)
def test_last_k_keeps_the_posterior_in_the_top_blocks_and_the_head(method):
    model = adapted(method, "last:1")
    variance = {"melora": "melora_core_rho", "blob": "blob_A_g"}[method]
    for name, layer in layers(model).items():
        bayesian = ".layers.3." in name or name.endswith("lm_head")
        assert layer.stochastic["default"] is bayesian, name
        assert ("default" in getattr(layer, variance)) is bayesian, name  # no variance parameter below
        assert (layer.posterior_std("default").numel() > 0) is bayesian
    expected = sum(
        float(layer.kl("default").detach()) for name, layer in layers(model).items() if layer.stochastic["default"]
    )
    assert float(model_kl(model).detach()) == pytest.approx(expected)
    assert all(
        float(layer.kl("default").detach()) == 0 for layer in layers(model).values() if not layer.stochastic["default"]
    )
    # the deterministic layers give the same output whether the model samples or not
    x = torch.randn(3, 5, 32)
    deterministic = next(layer for layer in layers(model).values() if not layer.stochastic["default"])
    with torch.no_grad():
        model.train()
        sampled = deterministic(x)
        model.eval()
        torch.testing.assert_close(sampled, deterministic(x))


@pytest.mark.parametrize("method", CONFIGS)
def test_every_layer_is_bayesian_by_default_and_last_0_leaves_the_head(method):
    everything, head = adapted(method, "all"), adapted(method, "last:0")
    assert all(layer.stochastic["default"] for layer in layers(everything).values())
    assert [name for name, layer in layers(head).items() if layer.stochastic["default"]] == ["base_model.model.lm_head"]
    assert first_bayesian_block(everything) is None  # block 0 samples: nothing to share
    assert first_bayesian_block(adapted(method, "last:1")) == 3
    assert first_bayesian_block(head) == 4  # only the head: the whole stack is shared


def cloze_batch(tokenizer):
    scorer = ClozeScorer(tokenizer, num_classes=3)
    examples = [
        MultipleChoiceExample.from_question(f"Question {i}: what colour is the sky{'?' * (i + 1)}", c, i % 3)
        for i, c in enumerate([["blue", "red", "green"], ["a tree", "grass", "sea"], ["yes", "no", "maybe so"]])
    ]
    return scorer, scorer.collate(examples)


@pytest.mark.parametrize("spec", ["last:1", "last:0"])
@pytest.mark.parametrize("method", CONFIGS)
def test_samples_sharing_the_trunk_equal_the_tiled_pass_at_a_fraction_of_its_rows(method, spec, smol_tokenizer):
    """With the same random draws, the shared trunk gives the tiled pass's per-sample probabilities, while the
    deterministic blocks below see one copy of the batch instead of N."""
    model = adapted(method, spec, vocab=len(smol_tokenizer))
    scorer, batch = cloze_batch(smol_tokenizer)
    rows_seen: dict[str, list[int]] = {"bottom": [], "top": []}
    hooks = [
        model.base_model.model.model.layers[i].self_attn.q_proj.register_forward_pre_hook(
            lambda module, args, where=where: rows_seen[where].append(args[0].shape[0])
        )
        for i, where in ((0, "bottom"), (3, "top"))
    ]
    results = {}
    for share in (True, False):
        torch.manual_seed(7)
        results[share] = predict_batch(model, scorer, batch, n_samples=5, share_trunk=share)
    for hook in hooks:
        hook.remove()
    rows = batch["input_ids"].shape[0]
    assert rows_seen["bottom"] == [rows, 5 * rows]  # shared: one copy; tiled: five
    assert rows_seen["top"] == [5 * rows if spec == "last:1" else rows, 5 * rows]  # block 3 samples with last:1
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-5, rtol=0)
    assert not torch.allclose(results[True][1][0], results[True][1][1], atol=1e-4)  # the samples differ


def test_a_deterministic_trunk_saves_and_loads(tmp_path):
    model = adapted("melora", "last:2")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(four_block_llama(64), tmp_path).eval()
    assert [layer.stochastic["default"] for layer in layers(loaded).values()] == [
        layer.stochastic["default"] for layer in layers(model).values()
    ]
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad(), posterior_mean():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_selection_that_names_every_block_or_every_bayesian_layer_warns_that_it_is_all(tmp_path):
    """last:K with K >= the number of blocks is 'all'; so is sampling last:J of a run trained with last:K, J >= K."""
    import warnings

    from bayeslora.tuners.trunk import sampled_layers

    with pytest.warns(UserWarning, match="names every block of this model \\(it has 4\\)"):
        every = adapted("melora", "last:4")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        top = adapted("melora", "last:2")
        with sampled_layers(top, "last:1"):  # leaves block 2's posterior out: no warning
            pass
    with pytest.warns(UserWarning, match="the same as sample_layers='all'"), sampled_layers(top, "last:2"):
        pass
    every.save_pretrained(tmp_path)
    with warnings.catch_warnings():  # said when the adapter was made; not again each time it is loaded
        warnings.filterwarnings("error", message=".*names every block", category=UserWarning)
        PeftModel.from_pretrained(four_block_llama(64), tmp_path)
    stackless = get_peft_model(TwoLayers(), MeLoraConfig(r=2, target_modules=["q"]))
    refused = pytest.raises(ValueError, match="sample_layers='last:1' needs a model with a stack of blocks")
    with refused, sampled_layers(stackless, "last:1"):
        pass


@pytest.mark.parametrize("spec", ["top:2", "last:-1", "last:two", ""])
def test_a_malformed_bayesian_layers_is_refused_with_its_forms(spec):
    with pytest.raises(ValueError, match="'all' or 'last:K'"):
        parse_bayesian_layers(spec)
    with pytest.raises(ValueError, match="last:K"):
        MeLoraConfig(r=4, target_modules=TARGETS, bayesian_layers=spec)
    with pytest.raises(ValueError, match="--bayesian-layers must be 'all' or 'last:K'"):
        RunConfig(bayesian_layers=spec).validate()


def test_a_run_with_its_posterior_in_the_top_block_trains_and_evaluates(tiny_llama_dir, toy_task, tmp_path):
    import json

    from _toy_models import train_toy

    run = train_toy(tiny_llama_dir, toy_task, tmp_path / "run", method="melora", bayesian_layers="last:1", samples=3)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["bayesian_layers"] == "last:1"
    metrics = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    assert metrics["n_samples"] == 3 and 0 <= metrics["accuracy"] <= 1
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert any(row.get("kl", 0) > 0 for row in log)  # the top block's and the head's posterior is regularised


@pytest.mark.parametrize("method", CONFIGS)
def test_sampling_the_top_block_of_an_every_layer_posterior_is_the_last_1_model(method, smol_tokenizer):
    """``sampled_layers(model, "last:1")`` on a posterior in every layer: inside, only the top block and the head
    sample (the trunk below is shared) and the predictive equals, draw for draw, that of the ``last:1`` model with
    the same parameters; the lower layers' spread no longer matters; on exit every layer samples again."""
    from bayeslora.tuners.trunk import sampled_layers

    vocab = len(smol_tokenizer)
    everywhere, top = adapted(method, "all", vocab), adapted(method, "last:1", vocab)
    missing, _ = top.load_state_dict(everywhere.state_dict(), strict=False)  # the lower layers' spread is unused
    assert not [key for key in missing if "lora" in key or "melora" in key or "blob" in key]
    scorer, batch = cloze_batch(smol_tokenizer)

    def draws(model, spec: str) -> torch.Tensor:
        torch.manual_seed(7)
        with sampled_layers(model, spec):
            assert first_bayesian_block(model) == (None if model is everywhere and spec == "all" else 3)
            return predict_batch(model, scorer, batch, n_samples=4)[1]

    reference = draws(top, "all")
    torch.testing.assert_close(draws(everywhere, "last:1"), reference, atol=1e-6, rtol=0)
    assert all(layer.stochastic["default"] for layer in layers(everywhere).values())  # restored
    every_layer = draws(everywhere, "all")
    assert not torch.allclose(every_layer, reference, atol=1e-4)  # sampling every layer is another predictive
    variance = {"melora": "melora_core_rho", "blob": "blob_A_g"}[method]
    with torch.no_grad():  # widen the lower layers' posterior: sampling the top block only does not see it
        for name, p in everywhere.named_parameters():
            if variance in name and ".layers.3." not in name and "lm_head" not in name:
                p.add_(2.0)
    torch.testing.assert_close(draws(everywhere, "last:1"), reference, atol=1e-6, rtol=0)
    assert not torch.allclose(draws(everywhere, "all"), every_layer, atol=1e-4)


def test_an_evaluation_can_sample_the_top_blocks_only(tiny_llama_dir, toy_task, tmp_path):
    """``bayeslora eval --sample-layers last:1`` on a run with its posterior everywhere: recorded with the
    evaluation, another predictive than sampling every layer; a malformed value is refused."""
    import json

    import bayeslora as bl
    from _toy_models import train_toy
    from bayeslora.cli import main

    run = train_toy(tiny_llama_dir, toy_task, tmp_path / "run", method="melora", samples=3)
    assert main(["eval", "--run", str(run), "--sample-layers", "last:1", "--output-dir", str(tmp_path / "top")]) == 0
    metrics = json.loads((tmp_path / "top" / "eval" / "toy" / "metrics.json").read_text())
    assert metrics["sample_layers"] == "last:1" and metrics["n_samples"] == 3
    everywhere = json.loads((run / "eval" / "toy" / "metrics.json").read_text())
    assert everywhere["sample_layers"] == "all" and everywhere["nll"] != pytest.approx(metrics["nll"], abs=1e-7)
    from bayeslora.reporting.report import run_report

    table = run_report([run, tmp_path / "top"]).splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("| task"))
    header, rows = table[start], table[start + 2 : start + 4]  # after the header's --- line: the two evaluations
    column = header.split(" | ").index("predictive")
    assert [row.split(" | ")[column] for row in rows] == ["–", "samples, last:1"]  # the default shows as –
    from bayeslora.reporting.tables import predictive_label

    assert predictive_label({**metrics, "n_samples": 0}) is None  # the posterior mean: N says it
    assert predictive_label({**metrics, "posterior_predictive": "probit", "sample_layers": "all"}) == "probit"
    with pytest.raises(ValueError, match="--sample-layers must be 'all' or 'last:K'"):
        bl.evaluate(run, sample_layers="top:1", output_dir=tmp_path / "bad", progress=False)
