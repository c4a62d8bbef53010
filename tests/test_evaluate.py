"""evaluate.py: metrics, BM25, grouping, FLOP formulas, every task x method end to end."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
from conftest import random_model, tiny_args
from generator import AdapterGenerator, GeneratorConfig
from model import query_prompt

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "data" / "world"


# -----------------------------------------------------------------------------
# Metrics on hand-computed examples


def test_squad_normalisation_f1_em():
    assert evaluate.normalize_answer("The  Cat, sat!") == "cat sat"
    assert evaluate.exact_match("Tesk.", "tesk") == 1.0
    assert evaluate.exact_match("in Tesk", "Tesk") == 0.0
    # prediction [cat, sat], gold [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert evaluate.token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert evaluate.token_f1("dog", "cat") == 0.0
    scores = evaluate.qa_scores("Ostrum", ["Ostrum Mills", "Ostrum"])
    assert scores["em"] == 1.0 and scores["f1"] == 1.0  # best over all golds
    assert scores["em_shortest"] == 1.0
    scores = evaluate.qa_scores("Ostrum Mills", ["Ostrum Mills", "Ostrum"])
    assert scores["em"] == 1.0 and scores["em_shortest"] == 0.0
    assert scores["f1_shortest"] == pytest.approx(2 / 3)  # P = 1/2, R = 1


def test_f1_by_answer_form():
    assert [evaluate.answer_form(g) for g in ("1984", "Tesk", "the plumber", "Ostrum Mills", "Maro Velin")] == \
        ["number", "word", "word", "words", "words"]  # SQuAD's normalisation drops the article
    scores = evaluate.qa_scores("Ostrum", ["Ostrum Mills", "Ostrum"])
    assert scores["f1_words"] == scores["f1"] == 1.0  # the first gold's form, the F1 over all golds
    assert "f1_word" not in scores and "f1_number" not in scores
    rows = evaluate.summarize("recall", "m", [evaluate.Unit("", [], [], {"facts": 1})],
                              [{"scores": [evaluate.qa_scores(p, [g]) for p, g in
                                           (("1984", "1984"), ("1985", "1984"), ("Tesk", "Tesk"))],
                                "tokens": 1, "flops": 1, "query_flops": 1, "storage_floats": None}], 1.0, None)
    assert rows[0]["f1_number"] == 0.5 and rows[0]["f1_word"] == 1.0 and "f1_words" not in rows[0]
    tables = evaluate.markdown_tables("recall", rows)
    assert "F1 on answers that are a number" in tables and "several words" not in tables


def test_rouge_l_recall():
    assert evaluate.rouge_l_recall("ostrum mills bakery", "the ostrum bakery") == 1.0  # LCS 2 of 2
    assert evaluate.rouge_l_recall("bakery ostrum", "ostrum bakery") == 0.5  # LCS 1 of 2
    assert evaluate.rouge_l_recall("x y z", "a b c d") == 0.0


def test_macro_f1():
    # label a: tp 1, fp 1, fn 0 -> 2/3; label b: tp 2, fp 0, fn 1 -> 4/5
    assert evaluate.macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"]) == pytest.approx(11 / 15)


def test_bm25_by_hand():
    chunks = ["tesk baker", "mills potter potter", "tesk tesk"]
    # N = 3, n(tesk) = 2: idf = ln(1.5 / 2.5 + 1) = 0.470004; average length 7/3
    # chunk 0: tf 1 -> 0.470004 * 2.5 / (1 + 1.5 (0.25 + 0.75 * 2 / (7/3))) = 0.502294
    # chunk 2: tf 2 -> 0.470004 * 5 / (2 + 1.339286) = 0.703749
    scores = evaluate.bm25_scores("Tesk?", chunks)
    assert scores == pytest.approx([0.502294, 0.0, 0.703749], abs=1e-6)
    assert evaluate.best_chunk("tesk", " ".join(["word"] * 100 + ["tesk"] * 3)) == "tesk tesk tesk"
    assert [len(c.split()) for c in evaluate.chunk_words(" ".join(["w"] * 250))] == [100, 100, 50]


def test_document_grouping_by_token_budget():
    assert evaluate.group_documents(["a"] * 5, [3, 4, 2, 6, 1], 7) == [[0, 1], [2], [3, 4]]
    assert evaluate.group_documents(["a"] * 3, [9, 1, 1], 5) == [[0], [1, 2]]


# -----------------------------------------------------------------------------
# End to end on tiny data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random base with the bundled tokenizer, a random generator, and small data files."""
    root = tmp_path_factory.mktemp("eval")
    args = tiny_args(vocab_size=4096, max_seq_len=128)
    base = random_model(args)
    base.save_pretrained(root / "base")
    shutil.copy(ROOT / "data" / "tiny" / "tokenizer.model", root / "base")
    torch.manual_seed(0)
    gen = AdapterGenerator(args, GeneratorConfig(d_r=16, r=16, k=4, alpha=4, window=32, svd="exact"))
    with torch.no_grad():
        gen.mods["o_proj"].B.normal_(0, 0.2)
    gen.save(root / "gen")
    with open(WORLD / "streamingqa_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:8]
    with open(root / "sqa.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "question", "answers"])
        writer.writeheader()
        writer.writerows(rows)
    config = json.loads((WORLD / "metaicl" / "config" / "world_to_world.json").read_text())
    (root / "icl.json").write_text(json.dumps({"train": config["train"], "test": config["test"][:2]}))
    return root


def run(tiny: Path, task: str, out: str, *extra) -> dict:
    data = {"streamingqa": tiny / "sqa.csv", "metaicl": WORLD / "metaicl",
            "msc": WORLD / "msc_self_instruct_test.jsonl"}[task]
    argv = ["--task", task, "--base", str(tiny / "base"), "--generator", str(tiny / "gen"),
            "--data", str(data), "--out", str(tiny / out), "--device", "cpu", "--max_new_tokens", "4",
            "--ft_epochs", "1"]
    if task == "metaicl":
        argv += ["--config", str(tiny / "icl.json"), "--shots", "1", "2", "--seeds", "100", "13", "--limit", "2"]
    if task == "streamingqa":
        argv += ["--context_lengths", "64", "300"]
    if task == "msc":
        argv += ["--limit", "2"]
    return evaluate.main(argv + list(extra))  # later flags win


def test_streamingqa_lengths_follow_the_base_window(tiny):
    """Any base directory with a short window (here 128 tokens) gets the tiny lengths, not only the
    default one; a base with a long window gets the paper's."""
    argv = ["--task", "streamingqa", "--base", str(tiny / "base"), "--data", str(tiny / "sqa.csv"),
            "--out", str(tiny / "lengths"), "--device", "cpu", "--methods", "closed_book", "--limit", "1",
            "--max_new_tokens", "2"]
    rows = evaluate.main(argv)["rows"]
    assert sorted({r["context_length"] for r in rows}) == [128, 256, 512, 1024, 2048]
    assert evaluate.default_context_lengths(4096) == [512, 1024, 2048, 4096, 8192, 16384, 32768]


@pytest.mark.parametrize("task", ["streamingqa", "metaicl", "msc"])
def test_every_task_and_method_end_to_end(tiny, task):
    results = run(tiny, task, task)
    assert torch.is_grad_enabled()  # main() must not switch autograd off for the caller
    methods = {r["method"] for r in results["rows"]}
    diagnostics = {"adapter_oracle", "adapter_apart"} | ({"prompt_oracle"} if task != "msc" else set())
    expected_methods = set(evaluate.METHODS) - diagnostics
    assert methods == expected_methods
    out = tiny / task
    assert (out / "results.md").read_text().count("| adapter |") >= 2
    saved = json.loads((out / "results.json").read_text(), parse_constant=lambda name: pytest.fail(f"bare {name}"))
    if task == "metaicl":  # both test tasks are classification: no accuracy over non-classification ones
        assert all(r["non_classification_accuracy"] is None for r in saved["rows"] if r["task"] == "all")
    for m in expected_methods:
        lines = [json.loads(x) for x in (out / f"predictions_{m}.jsonl").read_text().splitlines()]
        expected = {"streamingqa": 2 * 8, "metaicl": 2 * 2 * 2 * 2, "msc": 2}[task]
        assert len(lines) == expected and all("prediction" in x for x in lines)
    for r in results["rows"]:
        if "wall_s" in r:
            assert r["tokens"] > 0 and r["flops"] > 0 and r["wall_s"] > 0
    if task == "streamingqa":
        rows = {(r["method"], r["context_length"]): r for r in results["rows"]}
        assert rows["prompt", 300]["storage_floats"] > rows["prompt", 64]["storage_floats"]
        assert rows["adapter", 300]["storage_floats"] == rows["adapter", 64]["storage_floats"]  # fixed size
        assert all(0 <= r["f1"] <= 1 and 0 <= r["gold_rank"] <= 1 for r in rows.values())
        assert "gold answer's normalised rank" in (out / "results.md").read_text()
        assert "F1 on answers that are" in (out / "results.md").read_text()
        assert "wrong answers that occur word for word in the context" in (out / "results.md").read_text()
    if task == "msc":  # a row per method, a column per metric
        assert "| method | F1 | EM | ROUGE-L recall |" in (out / "results.md").read_text()
        assert "| prompt_oracle |" in (out / "results.md").read_text()
    if task == "metaicl":
        summary = [r for r in results["rows"] if r["task"] == "all"]
        assert {r["shots"] for r in summary} == {1, 2} and all("classification_accuracy" in r for r in summary)
        assert all(0 <= r["classification_label_top1"] <= 1 for r in summary)
        assert "the gold label scored above the task's other labels" in (out / "results.md").read_text()
        kept = {r["method"]: r.get("demos_in_prompt") for r in summary if r["shots"] == 2}
        assert kept["prompt"] == 2 and all(kept[m] is None for m in kept if m != "prompt")  # only prompt cuts them
        assert "demonstrations the prompt holds whole" in (out / "results.md").read_text()


def test_demos_in_prompt_counts_what_the_cut_prompt_holds(tiny):
    _, tokenizer = evaluate.load(tiny / "base", "cpu")
    demos = [(f"Pebor Koustom{i} works as a nurse.", f"label{i}") for i in range(16)]
    query = evaluate.fewshot_query("Mouten Houn works as a mechanic.")
    whole = len(query_prompt(tokenizer, query, evaluate.fewshot_context(demos)))
    for budget in (40, 100, 150, 246, whole):
        n = evaluate.demos_in_prompt(tokenizer, query, demos, budget)
        held = tokenizer.decode(evaluate.fitted_prompt(tokenizer, query, evaluate.fewshot_context(demos), budget))
        assert all(f"Input: {x}\nOutput: {y}" in held for x, y in demos[16 - n:])
        assert n == 16 or f"Input: {demos[15 - n][0]}\nOutput: {demos[15 - n][1]}" not in held  # the one before is cut
    assert n == 16 and evaluate.demos_in_prompt(tokenizer, query, demos, 10) == 0


def test_metaicl_labels_are_the_rank_candidates():
    units = evaluate.metaicl_units(WORLD / "metaicl", WORLD / "metaicl" / "config" / "world_to_world.json",
                                   [4], [100], 5)
    for u in units:
        if u.options:  # the gold label first, then the task's other labels
            assert all(c[0] == g[0] and sorted(c) == sorted(u.options) for c, g in zip(u.candidates, u.golds))
        else:  # free-form outputs have no candidates
            assert u.candidates == []
    assert sum(bool(u.options) for u in units) == 3


@pytest.mark.parametrize("per_token", [False, True])
def test_gold_rank_equals_scoring_each_answer_alone(tiny, per_token):
    model, tokenizer = evaluate.load(tiny / "base", "cpu")
    prompts = [query_prompt(tokenizer, q) for q in ("Where was Maro Velin born?", "When?")]
    candidates = [["Tesk", "Brohoum", "Vaihen 2", "Gofom"], ["1984", "2001", "1962"]]
    ranks = evaluate.gold_ranks(model, tokenizer, prompts, candidates, per_token=per_token)
    for prompt, answers, rank in zip(prompts, candidates, ranks):
        logp = []
        for a in answers:  # one unpadded sequence per answer
            ids = tokenizer.encode(a, bos=False)
            lp = model(torch.tensor([prompt + ids]))[0].log_softmax(-1)
            logp.append(sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids)) / (len(ids) if per_token else 1))
        above = sum(x > logp[0] for x in logp[1:])
        assert rank == {"gold_rank": above / (len(answers) - 1), "gold_top1": float(above == 0)}


def test_msc_oracle_is_the_session_that_states_the_answer():
    units = evaluate.msc_units(WORLD / "msc_self_instruct_test.jsonl", 100)
    for unit in units:
        sessions = unit.context.split("\n\n")
        assert len(unit.oracles) == 1 and unit.oracles[0] in sessions
        stated = [s for s in sessions if re.search(rf"^Speaker 1: .*\b{re.escape(unit.golds[0][0])}\b", s, re.M)]
        assert unit.oracles[0] == stated[-1]  # the session where Speaker 1 says it
    assert evaluate.oracle_session(["a b", "c d", "b c"], "b") == "b c"  # the latest on a tie
    assert evaluate.oracle_session(["a b", "c d"], "c d") == "c d"


def test_oracle_prompt_holds_the_oracle_session_only(tiny, monkeypatch):
    model, tokenizer = evaluate.load(tiny / "base", "cpu")
    unit = evaluate.Unit("first session\n\nSpeaker 1: I have a dog named Rex.", ["What is my dog called?"],
                         [["Rex"]], {}, oracles=["Speaker 1: I have a dog named Rex."])
    asked = []
    monkeypatch.setattr(evaluate, "answer", lambda model, tok, prompts, *rest, **kw: asked.extend(prompts) or ([""], 1, 1))
    evaluate.run_method("prompt_oracle", unit, model, tokenizer, None, evaluate.Settings(2, 4, 0, 0.0, 1, 0))
    assert asked == [query_prompt(tokenizer, unit.queries[0], unit.oracles[0])]


def test_wrong_in_context():
    context = "Bram Tosk was born in Lovel.\n\nDira Fenn was born in New Tarn."
    assert evaluate.wrong_in_context("New Tarn", ["Lovel"], context) == 1.0  # another person's city
    assert evaluate.wrong_in_context("the new tarn.", ["Lovel"], context) == 1.0  # normalised as F1 is
    assert evaluate.wrong_in_context("Lovel", ["Paris", "Lovel"], context) == 0.0  # right
    assert evaluate.wrong_in_context("Paris", ["Lovel"], context) == 0.0  # not in the context
    assert evaluate.wrong_in_context("Tar", ["Lovel"], context) == 0.0  # whole words only
    assert evaluate.wrong_in_context("", ["Lovel"], context) == 0.0


def test_streamingqa_oracle_is_the_questions_document():
    records = {r.question: r for r in evaluate.read_streamingqa(WORLD / "streamingqa_test.csv")}
    tokenizer = evaluate.Tokenizer(str(ROOT / "data" / "tiny" / "tokenizer.model"))
    units = evaluate.streamingqa_units(WORLD / "streamingqa_test.csv", tokenizer, [256], 40)
    for unit in units:
        assert len(unit.oracles) == len(unit.queries)
        for query, oracle in zip(unit.queries, unit.oracles):
            assert oracle == records[query].document and oracle in unit.context



def test_streamingqa_scores_by_documents_and_what_the_cut_prompt_holds(tiny):
    tokenizer = evaluate.Tokenizer(str(ROOT / "data" / "tiny" / "tokenizer.model"))
    units = evaluate.streamingqa_units(WORLD / "streamingqa_test.csv", tokenizer, [128, 256], 150)
    assert {u.documents for u in units} >= {1, 2, 3}  # both kinds of context at 128 tokens, several at 256
    assert all(u.documents == len(u.context.split("\n\n")) for u in units)  # a document is one paragraph
    assert all(u.subset == ("one_document" if u.documents == 1 else "several_documents") for u in units)
    model, tokenizer = evaluate.load(tiny / "base", "cpu")  # a window of 128 tokens
    first, second = "Bram Tosk was born in Lovel. " * 20, "Dira Fenn was born in New Tarn."
    unit = evaluate.Unit(f"{first}\n\n{second}", ["Where was Bram Tosk born?", "Where was Dira Fenn born?"],
                         [["Lovel"], ["New Tarn"]], {"context_length": 256}, oracles=[first, second], documents=2,
                         subset="several_documents")
    result = evaluate.run_method("prompt", unit, model, tokenizer, None, evaluate.Settings(2, 4, 0, 0.0, 1, 0))
    assert [h["document_in_prompt"] for h in result["held"]] == [0.0, 1.0]  # the cut took the first
    scores = evaluate.score_unit(unit, ["Lovel", "Lovel"], [], result["held"])
    assert [(s["f1_several_documents"], s["em_several_documents"], s["document_in_prompt"]) for s in scores] == \
        [(1.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    assert [s["wrong_in_context_several_documents"] for s in scores] == [0.0, 1.0]  # Lovel for New Tarn
    assert "f1_one_document" not in scores[0]
    alone = evaluate.Unit(second, unit.queries[1:], unit.golds[1:], {"context_length": 128}, oracles=[second],
                          documents=1, subset="one_document")
    assert evaluate.score_unit(alone, ["New Tarn"], [])[0]["f1_one_document"] == 1.0
    rows = [{"method": "prompt", "context_length": 256, **s} for s in scores[:1]]
    assert "questions whose document the prompt holds whole" in evaluate.markdown_tables("streamingqa", rows)

def test_adapter_oracle_answers_each_query_from_its_own_part(tiny):
    """adapter_oracle = the adapter method run on each query's oracle as the whole context, each
    distinct oracle streamed once; an adapter of the same size."""
    model, tokenizer = evaluate.load(tiny / "base", "cpu")
    generator = AdapterGenerator.load(tiny / "gen", model.args, "cpu")
    parts = ["Bram Tosk was born in Lovel.", "Dira Fenn works as a baker.", "Sela Moor lives in Tarn."]
    queries = ["Where was Bram Tosk born?", "What is Dira Fenn's job?", "Where was Bram born?"]
    golds = [["Lovel"], ["baker"], ["Lovel"]]
    candidates = [["Lovel", "Tarn"], ["baker", "nurse"], ["Lovel", "Tarn"]]
    unit = evaluate.Unit("\n\n".join(parts), queries, golds, {}, candidates=candidates,
                         oracles=[parts[0], parts[1], parts[0]])
    settings = evaluate.Settings(4, 4, 0, 0.0, 1, 0)
    oracle = evaluate.run_method("adapter_oracle", unit, model, tokenizer, generator, settings)
    for i in range(3):
        alone = evaluate.Unit(unit.oracles[i], [queries[i]], [golds[i]], {}, candidates=[candidates[i]])
        single = evaluate.run_method("adapter", alone, model, tokenizer, generator, settings)
        assert oracle["predictions"][i] == single["predictions"][0]
        assert oracle["ranks"][i] == single["ranks"][0]
    streamed = sum(len(evaluate.context_ids(tokenizer, p)) for p in parts[:2])  # two distinct oracles, once each
    assert oracle["tokens"] - streamed == evaluate.run_method("closed_book", unit, model, tokenizer, None, settings)["tokens"]
    whole = evaluate.run_method("adapter", unit, model, tokenizer, generator, settings)
    assert whole["storage_floats"] == oracle["storage_floats"]


def test_adapter_apart_adds_up_the_states_of_the_parts(tiny):
    """adapter_apart = the adapter of the sum of the parts' states, each part streamed alone; with
    one part it is the adapter method."""
    model, tokenizer = evaluate.load(tiny / "base", "cpu")
    generator = AdapterGenerator.load(tiny / "gen", model.args, "cpu")
    with torch.no_grad():
        generator.mods["o_proj"].B.mul_(20)  # an adapter strong enough to change the random base's answers
    parts = ["Bram Tosk was born in Lovel.", "Dira Fenn works as a baker.", "Sela Moor lives in Tarn."]
    queries, golds = ["Where was Bram Tosk born?", "What is Dira Fenn's job?"], [["Lovel"], ["baker"]]
    settings = evaluate.Settings(4, 4, 0, 0.0, 1, 0)
    candidates = [["Lovel", "Tarn"], ["baker", "nurse"]]
    unit = evaluate.Unit("\n\n".join(parts), queries, golds, {}, candidates=candidates, parts=parts)
    apart = evaluate.run_method("adapter_apart", unit, model, tokenizer, generator, settings)
    states = [generator.contextualize(model, evaluate.context_ids(tokenizer, p)) for p in parts]
    total = states[0] + states[1] + states[2]
    for m, S in total.S.items():
        torch.testing.assert_close(S, states[0].S[m] + states[1].S[m] + states[2].S[m])
    assert total.tokens == sum(s.tokens for s in states)
    with evaluate.merged(model, generator.lora(total)):
        by_hand = evaluate.answer(model, tokenizer, [evaluate.query_prompt(tokenizer, q) for q in queries], settings)
    assert apart["predictions"] == by_hand[0]
    closed = evaluate.run_method("closed_book", unit, model, tokenizer, None, settings)
    assert apart["tokens"] - closed["tokens"] == total.tokens  # each part streamed once
    joint = evaluate.run_method("adapter", unit, model, tokenizer, generator, settings)
    assert joint["tokens"] != apart["tokens"]  # one context against three
    assert closed["predictions"] != apart["predictions"]  # the adapter changes the answers
    one = evaluate.Unit(parts[0], queries, golds, {}, candidates=candidates, parts=parts[:1])
    assert (evaluate.run_method("adapter_apart", one, model, tokenizer, generator, settings)
            == evaluate.run_method("adapter", one, model, tokenizer, generator, settings))


def test_same_kind_answers():
    records = evaluate.read_streamingqa(WORLD / "streamingqa_test.csv")
    alike = evaluate.same_kind_answers(records)
    for r in records[:40]:
        answers = alike(r)
        assert answers[0] == r.answers[0] and len(set(answers)) == len(answers) <= evaluate.RANK_CANDIDATES
        assert all(a.isdigit() == r.answers[0].isdigit() for a in answers)
        assert answers == alike(r)  # fixed per question
    assert sum(len(alike(r)) == evaluate.RANK_CANDIDATES for r in records) > len(records) / 2


def test_recall_probe(tiny):
    units = evaluate.recall_units([1, 5], 3)
    assert [u.key["facts"] for u in units] == [1, 1, 1, 5, 5, 5]
    for u in units:  # n sentences about n people; the answer is stated once
        assert u.context.count(".") >= u.key["facts"] and u.golds[0][0] in u.context
    ladder = evaluate.Ladder()  # "alike": the other facts of the asked kind, which sets the unit's subset
    for i in range(40):
        r = ladder.recall("test", 4, f"alike/{i}")
        years = re.findall(r"\b\d{4}\b", r["context"])
        if r["answer"].isdigit():  # a year asked: the other years of the context are the alike facts
            assert r["alike"] == len(years) - 1
    kinds = {u.subset for u in evaluate.recall_units([1, 4], 20)}
    assert kinds == {"same_kind", "other_kinds"}
    assert all(u.subset == "other_kinds" for u in evaluate.recall_units([1], 5))  # one fact: nothing alike
    results = evaluate.main(["--task", "recall", "--base", str(tiny / "base"), "--generator", str(tiny / "gen"),
                             "--facts", "1", "5", "--limit", "2", "--methods", "prompt,adapter",
                             "--max_new_tokens", "4", "--out", str(tiny / "recall"), "--device", "cpu"])
    assert {(r["method"], r["facts"]) for r in results["rows"]} == {(m, n) for m in ("prompt", "adapter") for n in (1, 5)}
    assert "EM by facts in the context" in (tiny / "recall" / "results.md").read_text()
    assert "EM on contexts where every other fact is of another kind" in (tiny / "recall" / "results.md").read_text()
    same = evaluate.Unit("Ana Lor was born in 1950. Bo Lin was born in 1960.", ["When was Bo Lin born?"],
                         [["1960"]], {"facts": 2}, subset="same_kind")
    row = {"method": "prompt", "facts": 2, **evaluate.score_unit(same, ["1950"], [])[0]}
    assert row["em_same_kind"] == 0.0 and row["wrong_in_context_same_kind"] == 1.0  # the other person's year
    assert "another fact of the context given, on contexts where another fact is of the asked kind" in \
        evaluate.markdown_tables("recall", [row])
    with pytest.raises(ValueError, match="the recall probe makes its contexts"):
        evaluate.parse_args(["--task", "recall", "--data", "x.csv"])
    with pytest.raises(ValueError, match="--facts is not used by --task streamingqa"):
        evaluate.parse_args(["--task", "streamingqa", "--facts", "4"])


def test_lookup_probe(tiny):
    """Each context shows every label of its invented classification; the query's key is among the
    demonstrations' (repeat: its input is one of theirs), so a reader that looks it up is always right."""
    for repeat in (False, True):
        units = evaluate.lookup_units([1, 4, 8], repeat, 20)
        assert [u.key["shots"] for u in units] == [1] * 20 + [4] * 20 + [8] * 20
        for u in units:
            outputs = [y for _, y in u.demos]
            assert len(u.demos) == u.key["shots"] and sorted(set(outputs)) == sorted(u.options)
            assert (len(u.options) == 1) == (u.key["shots"] == 1) and len(u.options) <= 4
            assert u.candidates == [[u.golds[0][0], *(o for o in u.options if o != u.golds[0][0])]]
            query = u.queries[0].removeprefix("Input: ").removesuffix("\nOutput:")
            if repeat:
                assert (query, u.golds[0][0]) in u.demos
            else:  # a new input, whose key's value (so its label) a demonstration shows
                assert any(y == u.golds[0][0] for _, y in u.demos)
        assert evaluate.lookup_units([4], repeat, 3)[2].context == units[22].context  # a function of (K, i)
    key_units = evaluate.lookup_units([8], False, 40)
    assert sum(u.queries[0].removeprefix("Input: ").removesuffix("\nOutput:") in [x for x, _ in u.demos]
               for u in key_units) < 10  # mostly a new input with a known key
    results = evaluate.main(["--task", "lookup", "--base", str(tiny / "base"), "--generator", str(tiny / "gen"),
                             "--shots", "2", "4", "--limit", "3", "--methods", "prompt,adapter",
                             "--out", str(tiny / "lookup"), "--device", "cpu"])
    assert {(r["method"], r["shots"]) for r in results["rows"]} == {(m, k) for m in ("prompt", "adapter") for k in (2, 4)}
    assert all(0 <= r["majority_label"] <= 1 for r in results["rows"])
    text = (tiny / "lookup" / "results.md").read_text()
    assert "accuracy by demonstrations in the context" in text and "most frequent label" in text


def test_reruns_are_identical(tiny):
    a = run(tiny, "streamingqa", "first", "--methods", "closed_book,rag,finetune,adapter")
    b = run(tiny, "streamingqa", "second", "--methods", "closed_book,rag,finetune,adapter")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "peak_mb")} for r in rows]
    assert strip(a["rows"]) == strip(b["rows"])
    assert (tiny / "first" / "predictions_adapter.jsonl").read_text() == (tiny / "second" / "predictions_adapter.jsonl").read_text()


# -----------------------------------------------------------------------------
# Bad input


def test_missing_columns_and_empty_answers(tiny, tmp_path):
    (tmp_path / "bad.csv").write_text("text,query,answer\na,b,c\n")
    with pytest.raises(ValueError, match="missing column.*question, answers; columns found: text, query, answer"):
        evaluate.main(["--task", "streamingqa", "--base", str(tiny / "base"), "--data", str(tmp_path / "bad.csv"),
                       "--methods", "closed_book", "--out", str(tmp_path / "o")])
    (tmp_path / "empty.csv").write_text('text,question,answers\n"doc","q?",""\n')
    with pytest.raises(ValueError, match="row 1.*'answers' is empty"):
        evaluate.main(["--task", "streamingqa", "--base", str(tiny / "base"), "--data", str(tmp_path / "empty.csv"),
                       "--methods", "closed_book", "--out", str(tmp_path / "o")])


def test_metaicl_errors(tiny, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"train": [], "test": ["no_such_task"]}))
    with pytest.raises(FileNotFoundError, match="no task 'no_such_task'; tasks found: "):
        run(tiny, "metaicl", "x", "--config", str(tmp_path / "cfg.json"))
    with pytest.raises(ValueError, match="--shots 32: .*_16_100_train.jsonl has only 16 demonstrations"):
        run(tiny, "metaicl", "x", "--shots", "32")


def test_generator_for_another_base(tiny, tmp_path):
    other = tmp_path / "other"
    random_model(tiny_args(vocab_size=4096, max_seq_len=128, n_layers=3)).save_pretrained(other)
    shutil.copy(ROOT / "data" / "tiny" / "tokenizer.model", other)
    with pytest.raises(ValueError, match="holds a generator for the base .* but this base is"):
        evaluate.main(["--task", "msc", "--base", str(other), "--generator", str(tiny / "gen"),
                       "--methods", "adapter", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("flag, value, low", [("limit", "0", 1), ("limit", "-1", 1), ("batch_size", "0", 1),
                                              ("max_new_tokens", "0", 1), ("ft_lr", "-0.1", 0)])
def test_numbers_out_of_range(flag, value, low):
    with pytest.raises(ValueError, match=f"--{flag}: expected at least {low}, got {value}"):
        evaluate.parse_args(["--task", "msc", f"--{flag}", value])


@pytest.mark.parametrize("argv, message", [
    (["--methods", "rag,rag"], "--methods rag,rag: expected some of closed_book,prompt,prompt_oracle,rag,finetune,"
                               "adapter,adapter_oracle,adapter_apart, each once"),
    (["--task", "metaicl", "--methods", "prompt_oracle"], "--methods prompt_oracle: only --task msc or streamingqa"),
    (["--task", "recall", "--methods", "adapter_oracle"], "--methods adapter_oracle: only --task msc or streamingqa"),
    (["--methods", "closed_book", "--generator", "g"], "--generator is only used by the adapter, adapter_oracle and "
                                                         "adapter_apart methods, which --methods closed_book leaves out"),
    (["--methods", "adapter", "--ft_rank", "4"], "--ft_rank is only used by the finetune method"),
    (["--shots", "4"], r"--shots is not used by --task msc \(it is for --task metaicl and lookup\)"),
    (["--task", "metaicl", "--query", "repeat"], r"--query is not used by --task metaicl \(it is for --task lookup\)"),
    (["--task", "lookup", "--data", "x"], "--data: the lookup probe makes its contexts"),
    (["--context_lengths", "128"], "--context_lengths is not used by --task msc"),
    (["--out", ""], "--out is empty"),
    (["--task", "metaicl", "--shots", "0"], "--shots: expected at least 1, got 0"),
])
def test_flag_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        evaluate.parse_args(["--task", "msc", *argv])  # a later --task wins


def test_flags_given_as_zero_are_honoured():
    args = evaluate.parse_args(["--task", "msc", "--ft_epochs", "0", "--ft_lr", "0", "--seed", "0"])
    assert (args.ft_epochs, args.ft_lr, args.seed, args.limit) == (0, 0.0, 0, 100)
    # not given, the fine-tuning learning rate is the one chosen on the task's validation data
    assert [evaluate.parse_args(["--task", t]).ft_lr for t in ("streamingqa", "metaicl")] == [1e-2, 1e-3]


def test_command_line_error_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--task", "metaicl", "--shots", "32",
                           "--methods", "closed_book", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (done.returncode, done.stderr) == (2, "evaluate.py: error: --shots 32: job_to_shift_16_100_train.jsonl "
                                                 "has only 16 demonstrations\n")
