"""Instruction data: prompt/completion and chat rows, the loss on the completion's tokens only (equal to the model's
own causal-LM loss on those labels), the posterior predictive per token against a float64 reference, training and
evaluation end to end; chat templates for multiple-choice prompts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model

import bayeslora as bl
from bayeslora.evaluation.completion_metrics import completion_log_likelihoods
from bayeslora.evaluation.scoring import IGNORE, ClozeScorer, CompletionScorer
from bayeslora.tasks import InstructionExample, MultipleChoiceExample
from bayeslora.tasks.files import TaskFileError, load_jsonl_task
from bayeslora.tuners.sampling import sample_copies, sampling


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _chat_rows(n, offset=0):
    return [
        {"messages": [{"role": "user", "content": f"Repeat the word {w}."}, {"role": "assistant", "content": w}]}
        for w in (["apple", "river", "stone", "cloud"] * n)[offset : offset + n]
    ]


def test_files_of_instruction_rows_are_tasks_of_their_own_kind(tmp_path):
    plain = load_jsonl_task(_write(tmp_path / "plain.jsonl", [{"prompt": "Say hi:", "completion": " hi"}]))
    chat = load_jsonl_task(_write(tmp_path / "chat.jsonl", _chat_rows(2)))
    assert plain.kind == chat.kind == "instruction"
    assert plain.train[0] == InstructionExample("Say hi:", " hi")
    assert chat.train[0].completion == "apple" and chat.train[0].messages[0] == ("user", "Repeat the word apple.")
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(TaskFileError, match=r"line 1: .*last \"assistant\" turn"):
        load_jsonl_task(bad)


def test_labels_cover_the_completion_only_and_the_loss_is_the_models_own(tiny_llama, smol_tokenizer):
    model, _ = tiny_llama
    scorer = CompletionScorer(smol_tokenizer)
    examples = [InstructionExample("Say it:", " apple"), InstructionExample.from_messages(_chat_rows(1)[0]["messages"])]
    batch = scorer.collate(examples)
    first = batch["labels"][0][batch["labels"][0] != IGNORE]
    assert smol_tokenizer.decode(first) == " apple" + smol_tokenizer.eos_token  # a plain completion learns to stop
    second = smol_tokenizer.decode(batch["labels"][1][batch["labels"][1] != IGNORE])
    assert second.startswith("apple") and "Repeat the word" not in second  # the chat's prompt is context only
    loss, _ = scorer.training_loss(model, batch)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss, reference)


def test_the_predictive_averages_token_probabilities_over_samples(smol_tokenizer, tiny_llama):
    model, _ = tiny_llama
    model = get_peft_model(model, bl.MeLoraConfig(r=4, target_modules=["q_proj", "v_proj"], sigma_init=0.5))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "melora_B" in name:
                parameter.normal_(0, 1.0)
    model.eval()
    scorer = CompletionScorer(smol_tokenizer)
    batch = scorer.collate([InstructionExample("Say it:", " apple"), InstructionExample("Now:", " river stone")])
    torch.manual_seed(3)
    mixture, mask = completion_log_likelihoods(model, scorer, batch, n_samples=4)
    torch.manual_seed(3)  # the same draws, one copy at a time, averaged in float64
    with torch.no_grad(), sampling(), sample_copies(2):
        per_copy, _ = scorer.token_log_likelihoods(model, scorer.repeat(batch, 4))
    reference = per_copy.view(4, 2, -1).double().exp().mean(0).log() * mask
    torch.testing.assert_close(mixture, reference)
    mean, _ = completion_log_likelihoods(model, scorer, batch, n_samples=0)
    assert not torch.allclose(mean, mixture)  # the samples differ from the posterior mean


def test_train_and_evaluate_on_chat_data_end_to_end(tiny_llama_dir, tmp_path):
    train_file = _write(tmp_path / "train.jsonl", _chat_rows(8))
    eval_file = _write(tmp_path / "eval.jsonl", _chat_rows(4, offset=1))
    run = bl.train(
        model=str(tiny_llama_dir), task=str(train_file), eval_tasks=[str(eval_file)], method="melora", rank=2,
        max_steps=6, batch_size=4, lr=1e-2, samples=3, logging_steps=2, output_dir=str(tmp_path / "run"),
        progress=False,
    )  # fmt: skip
    metrics = json.loads((run / "eval" / "eval" / "metrics.json").read_text())
    assert metrics["scoring"] == "completion" and metrics["n_examples"] == 4 and metrics["n_samples"] == 3
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["token_nll"]))
    rows = [json.loads(line) for line in (run / "eval" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["tokens"] > 0 for row in rows)
    total = sum(row["nll"] * row["tokens"] for row in rows) / sum(row["tokens"] for row in rows)
    assert total == pytest.approx(metrics["token_nll"], rel=1e-6)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if "nll" in line]
    assert log[-1]["nll"] < log[0]["nll"]  # the completions are learned
    with pytest.raises(ValueError, match="instruction data has no classes"):
        bl.train(model=str(tiny_llama_dir), task=str(train_file), early_stopping=True, output_dir=str(tmp_path / "x"))


def test_multiple_choice_through_the_chat_template(smol_tokenizer, tiny_llama):
    model, _ = tiny_llama
    example = MultipleChoiceExample.from_question("Which is a fruit?", ["apple", "river"], 0)
    plain, chat = ClozeScorer(smol_tokenizer, 2), ClozeScorer(smol_tokenizer, 2, chat_template=True)
    context, continuation = chat.chat_pair(example, example.contexts[0], example.continuations[0])
    assert context.endswith("<|im_start|>assistant\n")  # SmolLM2-Instruct's template opens the assistant's turn
    assert "Which is a fruit?" in context and "Question:" not in context and continuation == "apple"
    with torch.no_grad():
        scores = [s.class_logits(model, s.collate([example])) for s in (plain, chat)]
    assert not torch.allclose(scores[0], scores[1])
