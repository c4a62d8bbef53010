"""data/make_base.py: the tiny base's data, initialisation, an end-to-end run and its resumption."""

import json
import math
import random
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import cli
import training
from data import fresh_worlds, make_base
from data.fresh_worlds import ICL_MIX, MIX, READING_MIX
from model import Tokenizer, Transformer, chat_example, load, user_turn

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tiny" / "tokenizer.model"


def test_fresh_data_resumes_from_a_counter():
    tok = Tokenizer(TOKENIZER, template="mistral")
    source = make_base.FreshSource(tok, 128, seed=0)
    first = source.row()[0]
    assert len(first) == 128 and first[0] == tok.bos_id
    state = source.state_dict()
    examples = [source.example() for _ in range(3)]
    again = make_base.FreshSource(tok, 128, seed=0)
    again.load_state_dict(state)
    assert [again.example() for _ in range(3)] == examples
    assert all(len(ids) <= 128 and any(t != -100 for t in targets) for ids, targets in examples)
    batch = make_base.BaseBatches(source, source, 128).next(8)
    assert batch.tokens.shape == (8, 1, 128)
    assert (batch.task[0] == 0).all()  # a text window
    packed = batch.tokens[1, 0][batch.mask[1, 0]].tolist()
    assert packed.count(tok.bos_id) >= 1 and packed[0] == tok.bos_id  # whole examples, one after another
    answers = batch.targets[1, 0][batch.task[1, 0] == 1].tolist()
    eos_positions = [i for i, t in enumerate(packed) if t == tok.eos_id]
    assert answers.count(tok.eos_id) == len(eos_positions)  # each example's answer ends with its EOS
    assert torch.equal(batch.targets[1, 0, :len(packed) - 1], torch.tensor(packed[1:]))
    text_rows = (make_base.BaseBatches(source, source, 128, text_rows=0.5).next(8).task.sum(dim=(1, 2)) == 0)
    assert text_rows.tolist() == [True] * 4 + [False] * 4  # --text_rows 0.5: half the rows, the first


def test_copy_rows_recur_spans_of_earlier_pieces_and_are_functions_of_their_keys():
    tok = Tokenizer(TOKENIZER, template="mistral")
    source = make_base.FreshSource(tok, 256, seed=0, copy=0.5)
    rows = [source.row()[0] for _ in range(40)]
    texts = {tuple(tok.encode(source.worlds.text(f"0/0/{k}", library=k % 2 == 0))[:256]) for k in range(1, 80)}
    copies = [row for row in rows if tuple(row) not in texts]
    pieces = set(make_base.word_pieces(tok))
    assert all(row[0] == tok.bos_id and set(row[1:]) <= pieces for row in copies)
    assert 8 <= len(copies) <= 32 and all(len(row) == 256 for row in rows)
    for row in copies:
        # spans of at least 2 pieces recur: every third piece or more continues an earlier bigram
        seen, recurring = set(), 0
        for a, b in zip(row[1:], row[2:]):
            recurring += (a, b) in seen
            seen.add((a, b))
        assert recurring >= 50
        # and not by a period: fresh pieces keep coming between the spans, and the offsets back to
        # a span's earlier place vary
        assert sum(row.index(b) == i for i, b in enumerate(row) if i >= 64) >= 20
        offsets = {i - row.index(b, 1) for i, b in enumerate(row) if i > 1 and row.index(b, 1) < i}
        assert len(offsets) > 20
    again = make_base.FreshSource(tok, 256, seed=0, copy=0.5)
    again.load_state_dict({"count": 10})
    assert [again.row()[0] for _ in range(30)] == rows[10:]
    plain = make_base.FreshSource(tok, 256, seed=0)  # no copy rows: the text windows alone
    assert [plain.row()[0] for _ in range(3)] == [tok.encode(source.worlds.text(f"0/0/{k}", library=k % 2 == 0))[:256]
                                                for k in (1, 2, 3)]
    with pytest.raises(ValueError, match="--copy_rows 1.5: expected a share from 0 to 1"):
        make_base.parse_args(["--copy_rows", "1.5"])


def next_pieces(row: list[int], longest: bool) -> list[int]:
    """A reader of a row that predicts, after each position, what followed the latest earlier
    occurrence of the pieces before it: the longest such suffix (up to 8 pieces), or the last
    piece alone (one-piece induction)."""
    out = []
    for i in range(1, len(row) + 1):
        out.append(0)
        for m in range(min(8, i), 0, -1) if longest else [1]:
            ends = [j for j in range(m, i) if row[j - m:j] == row[i - m:i]]
            if ends:
                out[-1] = row[ends[-1]]
                break
    return out


class Reader(torch.nn.Module):
    """A stand-in base whose logits pick next_pieces' prediction."""

    def __init__(self, longest: bool):
        super().__init__()
        self.embed_tokens, self.longest = torch.nn.Embedding(4096, 1), longest

    def forward(self, tokens):
        picked = torch.tensor([next_pieces(row, self.longest) for row in tokens.tolist()])
        return torch.nn.functional.one_hot(picked, 4096).float()


def test_recall_rows_ask_keys_again_through_their_separator():
    tok = Tokenizer(TOKENIZER, template="mistral")
    source = make_base.FreshSource(tok, 256, seed=0, copy=0.25, recall=0.5)
    plain = make_base.FreshSource(tok, 256, seed=0, copy=0.25)
    rows, copy_only = [source.row()[0] for _ in range(40)], [plain.row()[0] for _ in range(40)]
    # the same draw picks copy rows first, so the copy rows are those of --copy_rows alone
    assert [r for r in rows if r in copy_only] == [r for r in copy_only if r in rows] and len(set(map(tuple, rows))) == 40
    assert 8 <= sum(r not in copy_only for r in rows) <= 32  # the recall rows, and the texts of other keys
    pieces, by_last = set(make_base.word_pieces(tok)), []
    for i in range(8):
        row, spans = source.recall_row(random.Random(f"r{i}"))
        asked = [p for p, _ in spans]
        assert len(row) == 256 and row[0] == tok.bos_id and set(row[1:]) <= pieces and len(asked) >= 5
        assert all(1 <= n <= 4 and p + n <= 256 for p, n in spans)  # a value's 1-4 pieces, within the row
        longest, last = next_pieces(row, longest=True), next_pieces(row, longest=False)
        # a repeated entry's value is found by its key and sep, not by what followed sep's last piece
        assert all(longest[p - 1] == row[p] for p in asked)
        by_last += [last[p - 1] == row[p] for p in asked]
    assert sum(by_last) / len(by_last) < 0.5
    assert make_base.recall_accuracy(Reader(longest=True), tok, rows=4) == 1.0
    assert make_base.recall_accuracy(Reader(longest=False), tok, rows=4) < 0.6
    with pytest.raises(ValueError, match=r"--copy_rows 0.75 \+ --recall_rows 0.5: expected at most 1"):
        make_base.parse_args(["--copy_rows", "0.75", "--recall_rows", "0.5"])
    with pytest.raises(ValueError, match="--recall_rows -0.1: expected a share from 0 to 1"):
        make_base.parse_args(["--recall_rows", "-0.1"])


def test_recall_loss_moves_a_recall_rows_asked_values_into_the_answer_loss_or_keeps_them_alone():
    """--recall_loss: the same rows; 'text' (the default) every next token in the loss 'text';
    'answer' each asked value's pieces, where they are predicted, in the loss 'answer', the rest
    in 'text'; 'asked' those pieces alone. Text windows keep every token in 'text'."""
    tok = Tokenizer(TOKENIZER, template="mistral")
    batches, drawn = {}, []
    for loss in make_base.RECALL_LOSSES:
        source = make_base.FreshSource(tok, 256, seed=0, recall=0.5, recall_loss=loss)
        recall_row = source.recall_row
        source.recall_row = lambda rng: drawn.append(recall_row(rng)) or drawn[-1]  # the recall rows, in order
        batches[loss] = make_base.BaseBatches(source, source, 256, text_rows=1.0).next(12)
    text, answer, asked = batches.values()
    assert torch.equal(text.tokens, answer.tokens) and torch.equal(text.tokens, asked.tokens)
    assert torch.equal(text.targets, answer.targets) and (text.task == 0).all()
    k = len(drawn) // 3  # each source drew the same recall rows
    assert 3 <= k <= 9 and drawn[:k] == drawn[k:2 * k] == drawn[2 * k:]
    recall = iter(drawn[:k])
    for i in range(12):
        if (answer.task[i] == 0).all():  # a text window: every next token, the loss 'text'
            assert asked.supervised[i].sum() == 255 and (asked.task[i] == 0).all()
            continue
        row, spans = next(recall)
        assert text.tokens[i, 0].tolist() == row and text.supervised[i].sum() == 255
        predicted = sorted(p for start, n in spans for p in range(start - 1, start + n - 1))
        assert answer.task[i, 0].nonzero().flatten().tolist() == predicted
        assert asked.supervised[i, 0].nonzero().flatten().tolist() == predicted
        assert (asked.task[i, 0, predicted] == 1).all()
        assert torch.equal(asked.targets[i, 0, predicted], text.tokens[i, 0, [p + 1 for p in predicted]])
    assert next(recall, None) is None
    assert make_base.parse_args(["--recall_loss", "asked"]).recall_loss == "asked"
    with pytest.raises(ValueError, match="--recall_loss all: expected one of text, answer, asked"):
        make_base.parse_args(["--recall_loss", "all"])


def test_resume_of_a_checkpoint_written_before_a_setting_existed():
    config = make_base.parse_args(["--recall_rows", "0.25"])
    older = {k: v for k, v in cli.flag_values(config).items() if k != "recall_rows"}
    training.check_resumed_config(older | {"recall_rows": 0.25}, config)
    with pytest.raises(ValueError, match=r"--recall_rows was 0.0, now 0.25"):  # missing: it had its default
        training.check_resumed_config(older, config)
    training.check_resumed_config(older, make_base.parse_args([]))


def test_lookup_rows_take_a_share_of_the_few_shot_records():
    tok = Tokenizer(TOKENIZER, template="mistral")
    assert make_base.FreshSource(tok, 128, seed=0).mix() is MIX  # no reading phase, no look-up rows
    source = make_base.FreshSource(tok, 256, seed=0, reading=10, lookup=0.25)
    assert source.mix() == pytest.approx(READING_MIX | {"fewshot": 0.0375, "lookup": 0.0125})
    source.icl = True
    mix = source.mix()
    assert mix == pytest.approx(ICL_MIX | {"fewshot": 0.375, "lookup": 0.125}) and math.isclose(sum(mix.values()), 1.0)
    with pytest.raises(ValueError, match="--lookup_rows -0.1: expected a share from 0 to 1"):
        make_base.parse_args(["--lookup_rows", "-0.1"])
    for flag in ("--invented_labels", "--lower_labels", "--invented_phrasing", "--many_documents", "--binding_rows"):
        with pytest.raises(ValueError, match=f"{flag} 2.0: expected a share from 0 to 1"):
            make_base.parse_args([flag, "2"])
    for value in ("1", str(len(fresh_worlds.LABELS) + 1)):
        with pytest.raises(ValueError, match=f"--common_labels {value}: expected 2 to {len(fresh_worlds.LABELS)}"):
            make_base.parse_args(["--common_labels", value])


def test_alike_pieces_lists_embeddings_a_base_cannot_tell_apart():
    torch.manual_seed(0)
    model = make_base.init_tiny_base(make_base.TINY_BASE).requires_grad_(False)
    tok = Tokenizer(TOKENIZER, template="mistral")
    assert make_base.alike_pieces(model, tok) == []
    embeddings = model.embed_tokens.weight
    embeddings[3:259] = embeddings[3]  # byte pieces: not counted
    assert make_base.alike_pieces(model, tok) == []
    embeddings[1000:1010] = 2 * embeddings[900]  # the same direction
    assert make_base.alike_pieces(model, tok) == [900, *range(1000, 1010)]


def test_redraw_alike_gives_alike_pieces_directions_of_their_own_and_keeps_the_rest():
    torch.manual_seed(0)
    model = make_base.init_tiny_base(make_base.TINY_BASE).requires_grad_(False)
    tok = Tokenizer(TOKENIZER, template="mistral")
    embeddings = model.embed_tokens.weight
    embeddings[1000:1010] = 3 * embeddings[900]  # one shared direction, longer than the rest
    before = embeddings.clone()
    assert make_base.redraw_alike(model, tok) == 11
    assert make_base.alike_pieces(model, tok) == []
    drawn = [900, *range(1000, 1010)]
    kept = torch.ones(len(embeddings), dtype=torch.bool)
    kept[drawn] = False
    assert torch.equal(embeddings[kept], before[kept])
    shift = torch.randn(make_base.TINY_BASE.dim) / make_base.TINY_BASE.dim ** 0.5
    embeddings += shift  # a mean shared by every piece, as training leaves one
    assert make_base.alike_pieces(model, tok) == []
    embeddings[1000:1010] = 3 * embeddings[900]
    assert make_base.redraw_alike(model, tok) == 11
    cosine = lambda rows: torch.nn.functional.cosine_similarity(rows, shift[None], dim=1).mean()
    words = embeddings[kept][259:]  # past the 3 special and 256 byte pieces
    assert abs(cosine(embeddings[drawn]) - cosine(words)) < 0.05  # drawn like the others
    with pytest.raises(ValueError, match="--redraw_alike: expected --init too"):
        make_base.parse_args(["--redraw_alike"])


def test_tiny_base_init():
    # unit-norm tied embeddings (what let the tiny base copy cities and occupations); 0.02 elsewhere,
    # residual outputs scaled by 1 / sqrt(2 L)
    torch.manual_seed(0)
    model = make_base.init_tiny_base(make_base.TINY_BASE).requires_grad_(False)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert abs(float(model.embed_tokens.weight.norm(dim=-1).mean()) - 1.0) < 0.02
    layer = model.layers[0]
    assert abs(float(layer.self_attn.q_proj.weight.std()) - 0.02) < 0.002
    assert abs(float(layer.self_attn.o_proj.weight.std()) - 0.02 / math.sqrt(2 * make_base.TINY_BASE.n_layers)) < 0.0005


def base_args(out: Path, *extra) -> list[str]:
    return ["--out", str(out), "--steps", "4", "--warmup", "2", "--batch_size", "4", "--micro_batch", "2",
            "--eval_interval", "4", "--eval_batches", "1", "--log_interval", "1", "--ckpt_interval", "2",
            "--icl_steps", "2", "--device", "cpu", *extra]


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_base_run_resumes_bit_identically(tmp_path, monkeypatch):
    """A few steps at tiny sizes, two in each phase; the same run killed after step 3 (its
    checkpoint is step 2, the end of the first phase) and resumed writes the same logs and the
    same model."""
    monkeypatch.setattr(make_base, "VAL_QUESTIONS", 4)
    tokenizer = tmp_path / "elsewhere" / "tokenizer.model"  # --tokenizer: trained with it, copied beside
    tokenizer.parent.mkdir()
    tokenizer.write_bytes(TOKENIZER.read_bytes())
    extra = ("--copy_rows", "0.5", "--tokenizer", str(tokenizer), "--micro_batch", "4")  # a text row a micro-batch
    assert make_base.main(base_args(tmp_path / "straight", *extra)) == tmp_path / "straight"
    real_log = training.log_step

    def interrupt(out, step, *a, **kw):
        record = real_log(out, step, *a, **kw)
        if step == 3:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(training, "log_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        make_base.main(base_args(tmp_path / "resumed", *extra))
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    monkeypatch.setattr(training, "log_step", real_log)
    make_base.main(base_args(tmp_path / "resumed", *extra, "--resume"))
    keep = ("step", "loss", "loss_text", "loss_answer", "lr", "grad_norm")
    straight, resumed = log(tmp_path / "straight"), log(tmp_path / "resumed")
    assert [{k: r[k] for k in keep} for r in resumed] == [{k: r[k] for k in keep} for r in straight]
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    assert straight[2]["lr"] == straight[0]["lr"]  # the last phase warms up anew
    for name in ("validation.jsonl", "model.safetensors", "config.json", "tokenizer.model"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert (tmp_path / "straight" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    validation = json.loads((tmp_path / "straight" / "validation.jsonl").read_text())
    assert set(validation) == {"step", "ppl", "exact_match_with_context", "exact_match_closed_book",
                               *(f"exact_match_fresh_{kind}" for kind in make_base.SKILLS), "alike_pieces",
                               "recall_rows"}
    assert set(validation["ppl"]) == set(make_base.TASKS)
    assert Transformer.from_pretrained(tmp_path / "straight").args.n_layers == make_base.TINY_BASE.n_layers


def test_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="needs text files and instruction files"):
        make_base.main(base_args(tmp_path, "--val_data", str(ROOT / "data" / "world" / "pretrain_validation.jsonl.gz")))
    with pytest.raises(ValueError, match="--steps: expected at least 1, got 0"):
        make_base.parse_args(["--steps", "0"])
    with pytest.raises(ValueError, match="--layers 0: expected at least 1"):
        make_base.parse_args(["--layers", "0"])
    with pytest.raises(ValueError, match="--width 130: expected a positive multiple of 4, the base's query heads"):
        make_base.parse_args(["--width", "130"])
    with pytest.raises(ValueError, match="--text_rows 1.5: expected a share from 0 to 1"):
        make_base.parse_args(["--text_rows", "1.5"])
    with pytest.raises(FileNotFoundError, match=r"tokenizer model .*nope\.model does not exist"):
        make_base.main(base_args(tmp_path / "no_tokenizer", "--tokenizer", str(tmp_path / "nope.model")))
    assert make_base.parse_args([]).out == str(ROOT / "runs" / "base")
    with pytest.raises(SystemExit) as exit:
        cli.run(make_base.main, "make_base.py", ["--steps", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "make_base.py: error: --steps: expected at least 1, got 0\n"
    # the script itself, run from elsewhere: one line on stderr, exit status 2, and no flag of train.py's
    done = subprocess.run([sys.executable, str(ROOT / "data" / "make_base.py"), "--k", "8"], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stderr.endswith("make_base.py: error: unrecognized arguments: --k 8\n")


def chat(tok: Tokenizer, r: dict) -> tuple[list[int], list[int]]:
    """A fresh record as FreshSource serves it: the chat example, context in the prompt."""
    return chat_example(tok, user_turn(r["prompt"], r["context"]), r["answer"], r["follow_ups"])


def test_fresh_source_reads_first_then_mixes():
    """The first `reading` draws follow READING_MIX, the later ones MIX."""
    tok = Tokenizer(TOKENIZER, template="mistral")
    source = make_base.FreshSource(tok, 100_000, seed=0, reading=20)  # long enough that nothing is redrawn
    drawn = [source.example() for _ in range(40)]
    worlds = source.worlds
    for mix, keys in ((READING_MIX, range(1, 21)), (MIX, range(21, 41))):
        assert [chat(tok, worlds.instruction(f"0/0/{k}", mix)) for k in keys] == drawn[keys[0] - 1:keys[-1]]
    assert any(worlds.instruction(f"0/0/{k}", MIX) != worlds.instruction(f"0/0/{k}", READING_MIX) for k in range(1, 41))


def test_the_phases_after_the_first_draw_by_icl_mix():
    """--icl_steps and --rounds make the last steps phases of their own, whose records follow
    ICL_MIX; the rounds peak at --round_lr."""
    config = make_base.parse_args(["--steps", "4", "--icl_steps", "1", "--rounds", "1", "--round_steps", "1",
                                   "--round_lr", "1e-4", "--lr", "1e-3", "--warmup", "0",
                                   "--batch_size", "4", "--micro_batch", "2"])
    assert config.phases() == [2, 1, 1] and make_base.parse_args(["--steps", "3", "--icl_steps", "0"]).phases() == [3]
    assert [training.learning_rate(step, config) for step in (0, 2, 3)] == pytest.approx([1e-3, 1e-3, 1e-4])
    rounds = make_base.parse_args(["--steps", "10", "--icl_steps", "0", "--rounds", "2", "--round_steps", "3"])
    assert rounds.phases() == [4, 3, 3] and [rounds.peak_lr(i) for i in range(3)] == [rounds.lr, 5e-4, 5e-4]
    with pytest.raises(ValueError, match=r"--icl_steps 1 \+ --rounds 1 x --round_steps 2: expected fewer than "
                                         r"--steps \(3\)"):
        make_base.parse_args(["--steps", "3", "--icl_steps", "1", "--rounds", "1", "--round_steps", "2"])
    with pytest.raises(ValueError, match=r"--icl_steps -1, .*: expected counts of at least 0"):
        make_base.parse_args(["--steps", "3", "--icl_steps", "-1"])
    tok = Tokenizer(TOKENIZER, template="mistral")
    fresh = make_base.FreshSource(tok, 2048, seed=0)  # long enough that no record is redrawn
    batches = make_base.FreshBatches(fresh, config)  # 2 micro-batches a step
    phases = []
    for _ in range(8):  # 4 steps of 2 micro-batches
        batches.next(2)
        phases.append(fresh.icl)
    assert phases == [False] * 4 + [True] * 4
    state = batches.state_dict()
    assert state["drawn"] == 8
    ahead = [fresh.example() for _ in range(3)]
    first = state["fresh"]["count"] + 1
    assert ahead == [chat(tok, fresh.worlds.instruction(f"0/0/{k}", ICL_MIX)) for k in range(first, first + 3)]
    again = make_base.FreshBatches(make_base.FreshSource(tok, 2048, seed=0), config)
    again.load_state_dict(state)
    assert again.drawn == 8 and again.fresh.count == state["fresh"]["count"]


def test_init_continues_a_base(tmp_path, monkeypatch):
    """--init starts from a base's weights: at a learning rate of almost 0 the run writes them
    back unchanged (a fresh draw would differ everywhere), or with --redraw_alike all but the
    alike pieces' embeddings; a base of another shape is refused."""
    monkeypatch.setattr(make_base, "VAL_QUESTIONS", 4)
    real_source = make_base.FreshSource
    out = make_base.main(base_args(tmp_path / "more", "--init", str(make_base.TINY), "--lr", "1e-12"))
    written, start = Transformer.from_pretrained(out).state_dict(), Transformer.from_pretrained(make_base.TINY).state_dict()
    assert written.keys() == start.keys()
    for name, tensor in start.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-6, msg=name)
    # --redraw_alike: the alike pieces of the start start anew, every other weight as loaded;
    # --copy_rows, --lookup_rows, --invented_labels, --lower_labels, --common_labels, --invented_phrasing,
    # --many_documents, --binding_rows, --recall_rows and --recall_loss reach the training data (FreshSource's
    # arguments after `reading`)
    shares = []

    class Recorded(real_source):
        def __init__(self, *args):
            shares.append(args[5:])
            super().__init__(*args)

    monkeypatch.setattr(make_base, "FreshSource", Recorded)
    redrawn = make_base.main(base_args(tmp_path / "redrawn", "--init", str(make_base.TINY), "--lr", "1e-12",
                                       "--redraw_alike", "--copy_rows", "0.25", "--lookup_rows", "0.5",
                                       "--invented_labels", "0.8", "--lower_labels", "0.4", "--common_labels", "100",
                                       "--invented_phrasing", "0.3", "--recall_rows", "0.125", "--recall_loss", "asked",
                                       "--many_documents", "0.6", "--binding_rows", "0.7"))
    # then validation's recall rows: no shares
    assert shares[0] == (0.25, 0.5, (0.8, 0.4, 100, 0.3, 0.6, 0.7), 0.125, "asked")
    alike = make_base.alike_pieces(*load(make_base.TINY))
    drawn = Transformer.from_pretrained(redrawn).state_dict()
    rows = torch.zeros(len(drawn["embed_tokens.weight"]), dtype=torch.bool)
    rows[alike] = True
    assert not torch.allclose(drawn["embed_tokens.weight"][rows], start["embed_tokens.weight"][rows], atol=1e-3)
    torch.testing.assert_close(drawn["embed_tokens.weight"][~rows], start["embed_tokens.weight"][~rows],
                               rtol=0, atol=1e-6)
    other = Transformer(replace(make_base.TINY_BASE, n_layers=2))
    other.save_pretrained(tmp_path / "other")
    refused = r"other/config.json: a base of shape .*n_layers=2.*make_base.py trains .*\(--layers 6, --width 128\)"
    with pytest.raises(ValueError, match=refused):
        make_base.main(base_args(tmp_path / "refused", "--init", str(tmp_path / "other")))
    deeper = make_base.main(base_args(tmp_path / "deeper", "--init", str(tmp_path / "other"), "--layers", "2"))
    assert Transformer.from_pretrained(deeper).args == replace(make_base.TINY_BASE, n_layers=2)
    # a narrower base from scratch, on recall rows alone, the loss on their asked values (the README's
    # recall study, at toy sizes)
    narrow = make_base.main(base_args(tmp_path / "narrow", "--width", "16", "--layers", "2", "--text_rows", "1.0",
                                      "--recall_rows", "1.0", "--recall_loss", "asked"))
    assert Transformer.from_pretrained(narrow).args == replace(make_base.TINY_BASE, n_layers=2, dim=16, head_dim=4,
                                                               hidden_dim=48)
    # no row packs records, and no recall row has a loss outside its asked values
    assert all("loss_text" not in r and "loss_answer" in r for r in log(narrow) if "step" in r)


def rebuild_commands(text: str) -> list[list[str]]:
    """The `python data/make_base.py` command lines of a text, continuation lines joined, as argv lists."""
    joined = text.replace("\\\n", " ")
    return [line.split("python data/make_base.py", 1)[1].split("#")[0].split()
            for line in joined.splitlines() if "python data/make_base.py --copy_rows" in line
            or "python data/make_base.py --init runs/tiny/" in line]


def test_the_bundled_bases_rebuild_is_written_the_same_everywhere_and_chains():
    """The three runs that rebuild data/tiny/ are the same in make_base.py's help, the README and
    data/README.md; each continues the one before, and their phases are those the README states:
    14,300 steps (9,000 reading and mixing, 2,500 few-shot-heavy, two rounds of 1,400 at 5e-4) with
    the three shares at 0.5, then 1,400 and 700 few-shot-heavy steps without invented phrasings."""
    docs = [make_base.__doc__, (ROOT / "README.md").read_text(), (ROOT / "data" / "README.md").read_text()]
    commands = [rebuild_commands(text) for text in docs]
    assert len(commands[0]) == 3 and commands[0] == commands[1] == commands[2]
    first, plain, last = (make_base.parse_args(argv) for argv in commands[0])
    assert first.phases() == [9000, 2500, 1400, 1400] and first.peak_lr(2) == 5e-4 and not first.init
    assert (first.copy_rows, first.lower_labels, first.invented_phrasing) == (0.5, 0.5, 0.5)
    assert plain.init == first.out and last.init == plain.out and ROOT / last.out == make_base.TINY and last.overwrite
    for run, steps in ((plain, 1400), (last, 700)):
        assert run.phases() == [1, steps - 1] and run.lr == 5e-4 and run.invented_phrasing == 0
        assert (run.copy_rows, run.lower_labels) == (0.5, 0.5)
    assert len({first.seed, plain.seed, last.seed}) == 3
