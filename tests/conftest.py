"""Shared fixtures: tiny random models and a sentencepiece tokenizer trained on the spot."""

import torch
import pytest

from model import ModelArgs, Transformer

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Maro Velin was born in Tesk and works as a baker for Ostrum Mills.",
    "[INST] Where was Maro Velin born? [/INST] Tesk",
    "Grüße aus Köln, naïve café, 東京 and São Paulo are unicode texts.",
    "Numbers like 1962 and 2024 appear in news reports every day.",
] * 40


def tiny_args(**overrides) -> ModelArgs:
    """A two-layer grouped-query model small enough for exact float32 checks."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                vocab_size=320, max_seq_len=128, rope_theta=10000.0, model_type="mistral",
                dtype="float32")
    return ModelArgs(**{**base, **overrides})


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """A model with random weights, norm weights included (so a lost norm is noticed)."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    """A BPE sentencepiece model with byte fallback and Llama's special ids."""
    import sentencepiece as spm
    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
        model_type="bpe", vocab_size=320, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    return folder / "tokenizer.model"


@pytest.fixture(autouse=True)
def one_line_errors(monkeypatch):
    """Tests of the scripts' one-line errors hold whatever the developer's GA_TRACEBACK."""
    monkeypatch.delenv("GA_TRACEBACK", raising=False)
