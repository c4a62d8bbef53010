"""data/make_tokenizer.py: the committed tokenizer reproduced; the tokenizer of fresh worlds."""

from pathlib import Path

import pytest
import sentencepiece as spm

from data import make_tokenizer
from data.fresh_worlds import MIX, FreshWorlds

ROOT = Path(__file__).resolve().parents[1]


def test_world_source_reproduces_the_committed_tokenizer(tmp_path):
    make_tokenizer.main(["--data", str(ROOT / "data"), "--out", str(tmp_path)])
    assert (tmp_path / "tokenizer.model").read_bytes() == (ROOT / "data" / "tiny" / "tokenizer.model").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]  # written atomically, nothing left beside


def test_fresh_source_is_llama_like_and_deterministic(tmp_path, monkeypatch):
    worlds = FreshWorlds()
    texts = list(make_tokenizer.fresh_texts(worlds, texts=2, records=3))
    r = worlds.instruction("tokenizer/2", MIX)
    assert texts[0] == worlds.text("tokenizer/0", library=True) and texts[1] == worlds.text("tokenizer/1")
    assert texts[-1] == make_tokenizer.chat_text(r["context"], r["prompt"], r["answer"], r["follow_ups"])
    assert texts[-1].startswith("[INST] ") and f"[/INST] {r['answer']}" in texts[-1]
    small = lambda: make_tokenizer.train_tokenizer(make_tokenizer.fresh_texts(worlds, texts=30, records=100), 500)
    model = small()
    assert small() == model  # the same bytes twice
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.vocab_size()) == (0, 1, 2, -1, 500)
    text = "[INST] Where was Tesk born in 1987? [/INST] Zürich  (2 spaces)\n"
    assert sp.decode(sp.encode(text)) == text  # byte fallback, no normalisation
    assert [p for p in sp.encode("1987", out_type=str) if p != "▁"] == ["1", "9", "8", "7"]  # digits one by one
    assert sp.is_byte(sp.encode("ü")[-1])
    monkeypatch.setattr(make_tokenizer.fresh_texts, "__defaults__", (30, 100))  # texts, records
    make_tokenizer.main(["--source", "fresh", "--vocab-size", "500", "--out", str(tmp_path)])
    assert (tmp_path / "tokenizer.model").read_bytes() == model


def test_bad_input(tmp_path, capsys):
    for argv, error in ((["--vocab-size", "100"], "--vocab-size 100: expected at least 300"),
                        (["--data", str(tmp_path)], f"--data {tmp_path}: no world/pretrain_train.jsonl.gz there"),
                        (["--source", "web"], "argument --source: invalid choice: 'web'")):
        with pytest.raises(SystemExit) as exit:
            make_tokenizer.main([*argv, "--out", str(tmp_path)])
        assert exit.value.code == 2 and error in capsys.readouterr().err
    assert not (tmp_path / "tokenizer.model").exists()
