"""Bayesian adapters trained by the user's own Trainer: ``bayesian_trainer(trl.SFTTrainer)`` and ``BayesianTrainer`` add
the method's terms to the trainer's loss, once per optimizer step, equal to what bayeslora's own training adds; a
plain Trainer that leaves them out is warned about."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import bayeslora as bl
from _toy_models import tiny_llama_config
from bayeslora.config import make_config
from bayeslora.methods import get_method
from bayeslora.training.losses import combine_losses

ADAPTERS = {
    "melora": lambda: bl.MeLoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "blob": lambda: bl.BlobConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "blora": lambda: bl.BLoraConfig(r=4, target_modules=["q_proj", "v_proj"], bayesian_core=True),
}


def _tiny_peft_model(tokenizer, peft_config):
    torch.manual_seed(0)
    config = tiny_llama_config(
        len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id
    )
    return get_peft_model(LlamaForCausalLM(config), peft_config)


def _chat_rows(n: int = 8) -> Dataset:
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} plus {i}?"},
                    {"role": "assistant", "content": f"It is {2 * i}."},
                ]
            }
            for i in range(n)
        ]
    )


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_sft_trainer_adds_the_methods_terms_as_the_cli_does(method, smol_tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    model = _tiny_peft_model(smol_tokenizer, ADAPTERS[method]())
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,  # the SFT loss is normalised over both micro-batches: the terms must be too
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        max_length=64,
        save_strategy="no",
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # B-LoRA's warning that 3 steps cannot close a gate
        trainer = bl.bayesian_trainer(trl.SFTTrainer)(
            model=model, args=args, train_dataset=_chat_rows(), processing_class=smol_tokenizer
        )
    assert trainer.bayeslora_method.name == method and trainer.n_train == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "trained without its own loss terms" warning
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "nll" in entry]
    assert len(logs) == 3
    for entry in logs:  # the loss is the SFT loss plus each term once per optimizer step
        extra = sum(entry.get(name, 0.0) for name in ("kl_term", "gate_cost"))
        assert entry["loss"] == pytest.approx(entry["nll"] + extra, rel=1e-4)
        assert entry["kl_term"] == pytest.approx(entry["beta"] * entry["kl"] / 8, rel=1e-4)
        assert entry["kl_term"] > 1.0  # not a rounding error next to the SFT loss
    if method == "blora":  # the gates' penalty in the sampled phase: between the open first step and the fixed last
        assert "gate_cost" not in logs[0] and logs[1]["gate_cost"] > 0 and "gate_cost" not in logs[2]

    # what bayeslora's own training adds for the same options, on the same model at the same step
    cli = make_config(method=method, batch_size=2, grad_accum=2, lr=1e-3, max_steps=3, bayesian_core=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli_loss = combine_losses(get_method(method).training_extras(model, get_method(method).resolve(cli), 8).losses)
    ours, theirs = trainer.extra_loss(model, trainer), cli_loss(model, trainer)
    assert ours.terms.keys() == theirs.terms.keys() and ours.terms
    for name in ours.terms:
        torch.testing.assert_close(ours.terms[name], theirs.terms[name])


def test_method_options_and_learning_rates_reach_the_optimizer(smol_tokenizer, tmp_path):
    model = _tiny_peft_model(smol_tokenizer, ADAPTERS["melora"]())
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to="none", use_cpu=True)
    data = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3])}] * 5
    trainer = bl.BayesianTrainer(
        model=model, args=args, train_dataset=data, method_options={"sigma_lr": 0.02, "kl_weight": 0.5}, n_train=100
    )
    assert trainer.n_train == 100 and trainer.method_config.kl_weight == 0.5
    optimizer = trainer.create_optimizer()
    variances = {id(p) for p in bl.methods.variational.variance_parameters(model)}
    lrs = {group["lr"] for group in optimizer.param_groups if {id(p) for p in group["params"]} <= variances}
    assert lrs == {0.02}
    with pytest.raises(ValueError, match=r"Unknown method option.*sigma_learning_rate"):
        bl.BayesianTrainer(model=model, args=args, train_dataset=data, method_options={"sigma_learning_rate": 1})
    with pytest.raises(ValueError, match="set by the TrainingArguments"):
        bl.BayesianTrainer(model=model, args=args, train_dataset=data, method_options={"lr": 1})


def test_bayesian_trainer_adds_the_kl_to_a_causal_lm_loss(smol_tokenizer, tmp_path):
    model = _tiny_peft_model(smol_tokenizer, ADAPTERS["melora"]())
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, gradient_accumulation_steps=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    trainer = bl.BayesianTrainer(model=model, args=args, train_dataset=[{"input_ids": ids[0]}] * 4)
    model.train()
    torch.manual_seed(1)
    with_kl = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
    torch.manual_seed(1)  # the same posterior sample
    alone = model(input_ids=ids, labels=ids).loss
    beta = trainer.extra_loss.beta(0, 0)
    torch.testing.assert_close(with_kl - alone, (beta * bl.model_kl(model) / 4).float())
    model.eval()  # an evaluation loss is the task loss
    torch.testing.assert_close(
        trainer.compute_loss(model, {"input_ids": ids, "labels": ids}), model(ids, labels=ids).loss
    )


def test_a_plain_trainer_training_a_bayesian_adapter_warns_once(smol_tokenizer, tmp_path):
    model = _tiny_peft_model(smol_tokenizer, ADAPTERS["melora"]())
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, report_to="none", use_cpu=True, save_strategy="no")
    data = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7])}] * 4
    with pytest.warns(UserWarning, match="without its own loss terms.*bayesian_trainer") as caught:
        Trainer(model=model, args=args, train_dataset=data).train()
    assert sum("without its own loss terms" in str(w.message) for w in caught) == 1
    plain = _tiny_peft_model(smol_tokenizer, LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = bl.BayesianTrainer(model=plain, args=args, train_dataset=data)  # no method: the Trainer as it is
    assert trainer.bayeslora_method is None and trainer.extra_loss is None


def test_bayesian_trainer_of_a_class_is_cached_and_checked():
    assert bl.bayesian_trainer(Trainer) is bl.BayesianTrainer
    assert bl.bayesian_trainer(bl.BayesianTrainer) is bl.BayesianTrainer
    with pytest.raises(TypeError, match="Trainer subclass"):
        bl.bayesian_trainer(dict)
