"""Shared fixtures: tiny models built from configs, and the packaged models cut to a few layers.

Nothing here touches the network: the environment is forced offline before transformers is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `dtype="auto"` on a CPU measures which of fp32 and bf16 is faster there; the tests pin fp32 so that their numbers
# do not depend on the machine (tests/test_precision.py checks the measurement and every method in half precision)
os.environ.setdefault("BAYESLORA_CPU_DTYPE", "float32")

import pytest
import torch

from _toy_models import tiny_llama_config, write_word_task


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The packaged SmolLM2 tokenizer (converted once into the user cache)."""
    from bayeslora.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer):
    """A 2-layer, 32-wide Llama with the SmolLM2 tokenizer, saved as a local model folder."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(
        len(smol_tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny_llama(tiny_llama_dir):
    from bayeslora.models import load_model

    return load_model(str(tiny_llama_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, 32-wide BERT with the packaged MiniLM tokenizer, saved as a local model folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from bayeslora.assets import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def toy_task(tmp_path):
    """Eight two-choice questions a tiny model can learn (see ``write_word_task``), as a JSONL task file."""
    return write_word_task(tmp_path / "toy.jsonl", 8)
