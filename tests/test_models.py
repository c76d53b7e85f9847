"""Model loading: aliases, default targets, layer truncation, clear errors."""

from __future__ import annotations

import pytest
import torch

from bayeslora.models import (
    ModelLoadError,
    check_target_modules,
    default_dtype,
    default_target_modules,
    load_model,
    truncate_layers,
)


def test_default_targets_per_architecture(tiny_llama, tiny_bert_dir):
    model, _ = tiny_llama
    assert default_target_modules(model) == ["q_proj", "v_proj", "lm_head"]
    bert, _ = load_model(str(tiny_bert_dir), head="classification", num_labels=2, device="cpu")
    assert default_target_modules(bert) == ["query", "value"]


def test_target_module_that_matches_nothing_lists_the_real_ones(tiny_llama):
    model, _ = tiny_llama
    check_target_modules(model, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"qproj match no linear layer.*q_proj, k_proj, v_proj, o_proj"):
        check_target_modules(model, ["qproj"])


def test_truncate_layers(tiny_llama):
    model, _ = tiny_llama
    truncate_layers(model, 1)
    assert len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"num_layers must be in 1\.\.1"):
        truncate_layers(model, 2)


def test_packaged_smollm2_cut_to_two_layers():
    model, tokenizer = load_model("smollm2-135m", num_layers=2)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 576 and len(model.model.layers) == 2
    assert next(model.parameters()).dtype == default_dtype(torch.device("cpu"))  # "auto"
    assert tokenizer.pad_token == "<|im_end|>"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the original


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="not a built-in alias"):
        load_model("no-such-org/no-such-model-xyz")


def test_auto_dtype_on_cpu_follows_the_override_the_tests_set():
    assert default_dtype(torch.device("cpu")) == torch.float32  # BAYESLORA_CPU_DTYPE, set in conftest.py
    assert default_dtype(torch.device("meta")) == torch.float32
