"""Generation with uncertainty: one posterior sample per answer, fixed across all its tokens; agreement summaries."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaForCausalLM

import bayeslora as bl
from _toy_models import tiny_llama_config
from bayeslora.evaluation.generation import answer_agreement, normalise_answer

PROMPTS = ["The capital of France is", "Two plus two equals", "Question: which is heavier?"]


def _melora_model(tokenizer, sigma: float, seed: int = 0):
    """A tiny Llama with a Me-LoRA adapter whose B is random (so the core matters) and whose σ is ``sigma``."""
    torch.manual_seed(seed)
    config = tiny_llama_config(
        len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id
    )
    model = get_peft_model(
        LlamaForCausalLM(config), bl.MeLoraConfig(r=4, target_modules=["q_proj", "v_proj"], sigma_param="exp")
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "melora_B" in name:
                parameter.normal_(0, 2.0)
            if "melora_core_rho" in name:
                parameter.fill_(math.log(sigma))
    return model.eval()


def test_normalised_answers_and_their_agreement():
    assert normalise_answer('  "Paris."\n') == "paris"
    assert normalise_answer("Two  words ") == "two words"
    majority, agreement, entropy, distinct = answer_agreement(["paris", "paris", "lyon", "paris"])
    assert (majority, agreement, distinct) == ("paris", 0.75, 2)
    assert entropy == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert answer_agreement(["a", "b"])[2] == pytest.approx(math.log(2))


def test_without_posterior_width_every_sample_answers_as_the_mean(smol_tokenizer):
    model = _melora_model(smol_tokenizer, sigma=1e-7)
    mean = bl.generate(model, smol_tokenizer, PROMPTS, samples=0, max_new_tokens=6)
    sampled = bl.generate(model, smol_tokenizer, PROMPTS, samples=5, max_new_tokens=6)
    for one, many in zip(mean, sampled, strict=True):
        assert len(one.answers) == 1 and len(many.answers) == 5
        assert {a.text for a in many.answers} == {one.answers[0].text}
        assert many.agreement == 1.0 and many.answer_entropy == 0.0 and many.distinct == 1
        for answer in many.answers:
            assert answer.log_likelihood == pytest.approx(one.answers[0].log_likelihood, abs=1e-4)


def test_a_wide_posterior_answers_differently_and_generation_is_deterministic_without_samples(smol_tokenizer):
    model = _melora_model(smol_tokenizer, sigma=3.0)
    sampled = bl.generate(model, smol_tokenizer, PROMPTS, samples=6, max_new_tokens=6)
    assert any(result.distinct > 1 for result in sampled)
    assert all(result.answer_entropy > 0 for result in sampled if result.distinct > 1)
    first = bl.generate(model, smol_tokenizer, PROMPTS, samples=0, max_new_tokens=6)
    again = bl.generate(model, smol_tokenizer, PROMPTS, samples=0, max_new_tokens=6)
    assert [r.answers[0].text for r in first] == [r.answers[0].text for r in again]


def test_one_sample_per_answer_fixed_for_every_generated_token(smol_tokenizer):
    """A forward hook on an adapted layer runs the layer on a fixed probe at every generation step: each row's
    output (its weights) never changes within its sequence, and rows differ (their own samples)."""
    model = _melora_model(smol_tokenizer, sigma=0.5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    probe = torch.randn(1, 1, layer.in_features)
    seen: list[torch.Tensor] = []
    busy = False

    def probe_weights(module, inputs, output):
        nonlocal busy
        if busy:
            return
        busy = True
        try:
            rows = inputs[0].shape[0]
            seen.append(module(probe.expand(rows, 1, -1)).detach().clone())  # (rows, 1, m): each row's weights
        finally:
            busy = False

    handle = layer.register_forward_hook(probe_weights)
    try:
        bl.generate(model, smol_tokenizer, PROMPTS[:2], samples=3, max_new_tokens=5)
    finally:
        handle.remove()
    assert len(seen) >= 6  # the prompt pass, the generated tokens, the log-likelihood pass
    for step in seen[1:]:
        torch.testing.assert_close(step, seen[0], rtol=0, atol=0)
    rows = seen[0][:, 0]
    assert all(not torch.allclose(rows[i], rows[j]) for i in range(6) for j in range(i + 1, 6))


def test_beams_share_their_answers_sample(smol_tokenizer):
    model = _melora_model(smol_tokenizer, sigma=1e-7)
    mean = bl.generate(model, smol_tokenizer, PROMPTS[:1], samples=0, max_new_tokens=4, num_beams=2)
    sampled = bl.generate(model, smol_tokenizer, PROMPTS[:1], samples=3, max_new_tokens=4, num_beams=2)
    assert {a.text for a in sampled[0].answers} == {mean[0].answers[0].text}


def test_chat_prompts_use_the_template_and_bad_arguments_are_named(smol_tokenizer):
    model = _melora_model(smol_tokenizer, sigma=0.1)
    chat = [[{"role": "user", "content": "Say hi."}]]
    result = bl.generate(model, smol_tokenizer, chat, samples=2, max_new_tokens=3)
    assert len(result[0].answers) == 2 and result[0].prompt == chat[0]
    with pytest.raises(ValueError, match="samples must be >= 0"):
        bl.generate(model, smol_tokenizer, PROMPTS, samples=-1)
    with pytest.raises(ValueError, match="num_return_sequences must be 1"):
        bl.generate(model, smol_tokenizer, PROMPTS, samples=2, num_return_sequences=2)


def test_a_stop_string_ends_each_answer(smol_tokenizer):
    model = _melora_model(smol_tokenizer, sigma=0.5)
    free = bl.generate(model, smol_tokenizer, PROMPTS[:2], samples=0, max_new_tokens=12)  # the same weights twice
    cut = bl.generate(model, smol_tokenizer, PROMPTS[:2], samples=0, max_new_tokens=12, stop=[" "])
    for long, short in zip(free, cut, strict=True):
        for whole, first in zip(long.answers, short.answers, strict=True):
            assert " " not in first.text and whole.text.startswith(first.text)
            assert first.tokens <= whole.tokens
