"""Scorers against straightforward references: every choice scored alone, unpadded, one at a time."""

from __future__ import annotations

import pytest
import torch

from bayeslora.evaluation.scoring import ClassificationScorer, ClozeScorer, LetterScorer, make_scorer
from bayeslora.tasks import ClassificationExample, MultipleChoiceExample, Task
from bayeslora.tuners.sampling import current_row_examples

QUESTIONS = [
    MultipleChoiceExample.from_question("Which gas do plants absorb?", ["oxygen", "carbon dioxide", "helium"], 1),
    MultipleChoiceExample.from_question(
        "What is the boiling point of water at sea level in degrees Celsius?", ["90", "100", "110", "212"], 1
    ),
    # WinoGrande style: one context per choice, a shared continuation
    MultipleChoiceExample(
        question="The trophy does not fit in the case because _ is too big.",
        choices=("the trophy", "the case"),
        answer=0,
        contexts=(
            "The trophy does not fit in the case because the trophy",
            "The trophy does not fit in the case because the case",
        ),
        continuations=(" is too big.", " is too big."),
    ),
]


def reference_loglik(model, scorer: ClozeScorer, example: MultipleChoiceExample) -> list[float]:
    """Mean/summed log-likelihood of each continuation, each (context + continuation) run alone."""
    scores = []
    for context, continuation in zip(example.contexts, example.continuations, strict=True):
        head, tail = scorer.encode_pair(context, continuation)
        ids = torch.tensor([head + tail])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.double().log_softmax(-1)[0]
        total = sum(float(logp[len(head) - 1 + j, token]) for j, token in enumerate(tail))
        scores.append(total / len(tail) if scorer.normalization == "mean" else total)
    return scores


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_cloze_packed_batch_equals_each_choice_alone(tiny_llama, normalization):
    model, tokenizer = tiny_llama
    scorer = ClozeScorer(tokenizer, num_classes=4, normalization=normalization)
    batch = scorer.collate(QUESTIONS)
    with torch.no_grad():
        logits = scorer.class_logits(model, batch)
    assert logits.shape == (3, 4)
    for row, example in enumerate(QUESTIONS):
        expected = torch.tensor(reference_loglik(model, scorer, example), dtype=torch.float32)
        torch.testing.assert_close(logits[row, : example.num_classes], expected, atol=2e-5, rtol=1e-5)
        assert torch.isinf(logits[row, example.num_classes :]).all()  # missing choices score -inf
    assert batch["labels"].tolist() == [1, 1, 0]


def test_cloze_shares_a_common_context_once(tiny_llama):
    _, tokenizer = tiny_llama
    scorer = ClozeScorer(tokenizer, num_classes=4)
    batch = scorer.collate(QUESTIONS[:1])
    head, _ = scorer.encode_pair(QUESTIONS[0].contexts[0], QUESTIONS[0].continuations[0])
    example = QUESTIONS[0]
    tails = [scorer.encode_pair(c, t)[1] for c, t in zip(example.contexts, example.continuations, strict=True)]
    # one row: the context once, then every continuation
    assert batch["input_ids"].shape == (1, len(head) + sum(map(len, tails)))


def test_cloze_gradients_are_finite_with_padding(tiny_llama):
    model, tokenizer = tiny_llama
    scorer = ClozeScorer(tokenizer, num_classes=4)
    batch = scorer.collate(QUESTIONS)
    logits = scorer.class_logits(model, batch)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_cloze_truncation_keeps_the_continuation_and_warns(tiny_llama):
    model, tokenizer = tiny_llama
    long_question = "word " * 200
    example = MultipleChoiceExample.from_question(long_question, ["yes", "no"], 0)
    scorer = ClozeScorer(tokenizer, num_classes=2, max_length=32)
    with pytest.warns(UserWarning, match="truncated"):
        batch = scorer.collate([example])
    assert batch["input_ids"].shape[1] <= 32
    tails = [scorer.encode_pair(c, t)[1] for c, t in zip(example.contexts, example.continuations, strict=False)]
    both = tails[0] + tails[1]
    assert batch["input_ids"][0, -len(both) :].tolist() == both  # the answers survive whole
    with torch.no_grad():
        assert torch.isfinite(scorer.class_logits(model, batch)).all()


def test_letter_scores_are_next_token_logits_of_the_answer_letters(tiny_llama):
    model, tokenizer = tiny_llama
    scorer = LetterScorer(tokenizer, num_classes=4)
    prompt = scorer.prompt(QUESTIONS[0])
    assert prompt == ("Question: Which gas do plants absorb?\n A. oxygen\n B. carbon dioxide\n C. helium\nAnswer:")
    letter_ids = [tokenizer(" " + letter, add_special_tokens=False).input_ids for letter in "ABCD"]
    assert all(len(ids) == 1 for ids in letter_ids)
    batch = scorer.collate(QUESTIONS[:2])  # different lengths: left padding matters
    with torch.no_grad():
        logits = scorer.class_logits(model, batch)
    for row, example in enumerate(QUESTIONS[:2]):
        ids = torch.tensor([tokenizer(scorer.prompt(example)).input_ids])
        with torch.no_grad():
            last = model(input_ids=ids).logits[0, -1]
        expected = last[[ids[0] for ids in letter_ids[: example.num_classes]]]
        torch.testing.assert_close(logits[row, : example.num_classes], expected, atol=2e-5, rtol=1e-5)
    assert torch.isinf(logits[0, 3])  # the three-choice question has no D


def test_classification_scorer_returns_the_head_logits(tiny_bert_dir):
    from bayeslora.models import load_model

    model, tokenizer = load_model(str(tiny_bert_dir), head="classification", num_labels=3, device="cpu")
    examples = [
        ClassificationExample("a fine film", 2),
        ClassificationExample("dull and long, far too long", 0),
    ]
    scorer = ClassificationScorer(tokenizer, num_classes=3)
    batch = scorer.collate(examples)
    with torch.no_grad():
        logits = scorer.class_logits(model, batch)
        expected = model(**tokenizer([e.text for e in examples], padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="out of range"):
        scorer.collate([ClassificationExample("x", 3)])


@pytest.mark.parametrize("scoring", ["cloze", "letter"])
def test_repeat_tiles_examples_for_batched_sampling(tiny_llama, scoring):
    model, tokenizer = tiny_llama
    task = Task("t", "multiple-choice", None, QUESTIONS, num_classes=4)
    scorer = make_scorer(task, tokenizer, scoring)
    batch = scorer.collate(QUESTIONS)
    tiled = scorer.repeat(batch, 3)
    with torch.no_grad():
        once = scorer.class_logits(model, batch)
        thrice = scorer.class_logits(model, tiled).view(3, len(QUESTIONS), -1)
    for copy in range(3):
        torch.testing.assert_close(thrice[copy], once, atol=2e-5, rtol=1e-5)
    assert tiled["labels"].tolist() == batch["labels"].tolist() * 3


def test_each_forward_announces_its_row_to_example_map(tiny_llama):
    model, tokenizer = tiny_llama
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(current_row_examples()))
    try:
        scorer = ClozeScorer(tokenizer, num_classes=4)
        batch = scorer.repeat(scorer.collate(QUESTIONS), 2)
        with torch.no_grad():
            scorer.class_logits(model, batch)
    finally:
        hook.remove()
    assert [m.tolist() for m in seen] == [list(range(6))]
    assert current_row_examples() is None


def test_make_scorer_rejects_mismatched_scoring(smol_tokenizer):
    cls_task = Task("c", "classification", [], [ClassificationExample("x", 0)], 2)
    with pytest.raises(ValueError, match="classification task"):
        make_scorer(cls_task, smol_tokenizer, "letter")
    mc_task = Task("m", "multiple-choice", [], QUESTIONS, 4)
    with pytest.raises(ValueError, match="Unknown scoring"):
        make_scorer(mc_task, smol_tokenizer, "bogus")


def test_cloze_runs_the_lm_head_on_the_continuation_tokens_only_with_each_rows_sample(tiny_llama, monkeypatch):
    """The head sees one position per continuation token; with a Bayesian head (each example its own sample, frozen
    across both passes) the scores equal those of the head run on every position."""
    from contextlib import contextmanager

    from peft import get_peft_model

    from bayeslora.evaluation import scoring
    from bayeslora.tuners import MeLoraConfig
    from bayeslora.tuners.sampling import frozen_samples

    base, tokenizer = tiny_llama
    torch.manual_seed(0)
    model = get_peft_model(base, MeLoraConfig(r=2, target_modules=["q_proj", "lm_head"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "melora_B" in name or "rho" in name:
                p.normal_(0, 0.5)
    scorer = ClozeScorer(tokenizer, num_classes=4)
    batch = scorer.repeat(scorer.collate(QUESTIONS), 3)
    seen = []
    head = model.get_base_model().get_output_embeddings()
    head.register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape[:2])))
    with torch.no_grad(), frozen_samples():
        gathered = scorer.class_logits(model, batch)

        @contextmanager
        def no_gather(*args):
            yield False

        monkeypatch.setattr(scoring, "head_on_targets", no_gather)
        everywhere = scorer.class_logits(model, batch)
    assert seen[0] == (batch["target_row"].shape[0], 1)  # K positions, one each
    assert seen[1][0] == batch["input_ids"].shape[0]  # the full rows
    torch.testing.assert_close(gathered, everywhere, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(gathered[:3], gathered[3:6], atol=1e-4)  # the copies' samples differ
