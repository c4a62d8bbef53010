"""Tests for data/: the world generator, the committed world files, the readers and the tokenizer."""

import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so that `data` imports under a bare `pytest` too

from data import fresh_worlds, make_world  # noqa: E402
from data.readers import (iter_texts, read_instructions, read_metaicl, read_metaicl_config, read_msc,  # noqa: E402
                          read_streamingqa)

WORLD = ROOT / "data" / "world"
METAICL = WORLD / "metaicl"
TOKENIZER = ROOT / "data" / "tiny" / "tokenizer.model"
SMALL = dict(people=(60, 30, 30), organisations=(25, 18, 18), events=(25, 18, 18), pretrain_train_bytes=20_000,
             pretrain_validation_records=2, streamingqa_documents=(4, 4), metaicl_test_examples=4,
             msc_users=(4, 3, 3), instructions=(40, 10))


def world_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def chat(record) -> str:
    return f"[INST] {record.context}\n\n{record.prompt} [/INST] {record.answer}"


# -----------------------------------------------------------------------------
# The generator

def test_generator_reproduces_committed_files(tmp_path):
    """A fresh run (another process, another hash seed) gives the committed files byte for byte."""
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "data/make_world.py", "--seed", "0", "--out", str(tmp_path)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    fresh, committed = world_files(tmp_path / "world"), world_files(WORLD)
    assert sorted(fresh) == sorted(committed)
    changed = [path for path in fresh if fresh[path] != committed[path]]
    assert not changed, f"regenerate with `python data/make_world.py`; differing files: {changed[:5]}"


def test_generator_same_seed_same_bytes():
    first = make_world.generate(make_world.WorldConfig(seed=7, **SMALL))
    assert first == make_world.generate(make_world.WorldConfig(seed=7, **SMALL))
    assert first != make_world.generate(make_world.WorldConfig(seed=8, **SMALL))


def test_gzip_header_is_fixed():
    data = (WORLD / "pretrain_train.jsonl.gz").read_bytes()
    assert data[4:8] == b"\0\0\0\0"  # mtime 0
    assert not data[3] & 0x08  # no file name


# -----------------------------------------------------------------------------
# The committed files parse and say what they should

def test_pretraining_text():
    texts = list(iter_texts(WORLD / "pretrain_validation.jsonl.gz"))
    assert 150 <= len(texts) <= 250
    assert all(200 <= len(t.split()) <= 2500 for t in texts)
    with gzip.open(WORLD / "pretrain_train.jsonl.gz", "rt", encoding="utf-8") as f:
        sets = {json.loads(line)["meta"]["redpajama_set_name"] for line in f}
    assert sets == {"RedPajamaWikipedia", "RedPajamaCommonCrawl"}
    assert sum(len(t) for t in iter_texts(WORLD / "pretrain_train.jsonl.gz")) > 5_000_000


@pytest.mark.parametrize("split, n_documents", [("validation", 100), ("test", 300)])
def test_streamingqa(split, n_documents):
    records = read_streamingqa(WORLD / f"streamingqa_{split}.csv")
    assert len({r.document for r in records}) == n_documents
    assert all(any(a in r.document for a in r.answers) for r in records)  # answerable from the document
    assert any(len(r.answers) > 1 for r in records)


def test_metaicl():
    config = read_metaicl_config(METAICL / "config" / "world_to_world.json")
    assert len(config["train"]) == 12 and len(config["test"]) == 6
    assert not set(config["train"]) & set(config["test"])
    for task in config["train"] + config["test"]:
        tests = [read_metaicl(METAICL, task, 16, seed, "test") for seed in (100, 13, 21, 42, 87)]
        assert len(tests[0]) == 40 and all(t == tests[0] for t in tests)
        for seed in (100, 13, 21, 42, 87):
            demos = read_metaicl(METAICL, task, 16, seed, "train")
            assert len(demos) == 16
            assert not {d.input for d in demos} & {t.input for t in tests[0]}
            assert all(len(d.input.split()) < 30 for d in demos)
    classification = [t for t in config["test"] if read_metaicl(METAICL, t, 16, 100, "test")[0].options]
    assert len(classification) == 3


@pytest.mark.parametrize("name, n_users", [("msc_self_instruct_test.jsonl", 100),
                                           ("msc_self_instruct_train.jsonl.gz", 500)])
def test_msc(name, n_users):
    records = read_msc(WORLD / name)
    assert len(records) == n_users
    for r in records:
        assert 3 <= len(r.previous_dialogs) <= 4
        assert all(6 <= len(session) <= 10 for session in r.previous_dialogs)
        said = [text for session in r.previous_dialogs for speaker, text in session if r.answer in text]
        assert said and any(speaker == "Speaker 1" and r.answer in text
                            for session in r.previous_dialogs for speaker, text in session)


def test_instructions():
    train = read_instructions(WORLD / "instructions_train.jsonl.gz")
    validation = read_instructions(WORLD / "instructions_validation.jsonl")
    assert len(train) == 20000 and len(validation) == 300
    for records in (train, validation):
        fewshot = [r for r in records if r.prompt.startswith("Input: ")]
        others = [r for r in records if not r.prompt.startswith("Input: ")]
        memory = [r for r in others if r.context.startswith("Speaker ")]
        assert fewshot and memory and len(memory) < len(others)
        assert all(r.prompt.endswith("\nOutput:") for r in fewshot)
        assert all(r.answer in r.context for r in others)  # QA and memory answers come from the context


# -----------------------------------------------------------------------------
# No fact about a validation or test entity reaches a training file

def words_in(texts) -> set[str]:
    words = set()
    for text in texts:
        words.update(re.findall(r"[A-Za-z]+", text))
    return words


def split_words(split: str) -> set[str]:
    """Every word written in the files of one split."""
    config = read_metaicl_config(METAICL / "config" / "world_to_world.json")
    metaicl_tasks = config["train"] if split == "train" else config["test"] if split == "test" else []
    texts = [p.read_text(encoding="utf-8") for task in metaicl_tasks for p in (METAICL / task).glob("*.jsonl")]
    if split == "train":
        texts += iter_texts(WORLD / "pretrain_train.jsonl.gz")
        texts += [chat(r) for r in read_instructions(WORLD / "instructions_train.jsonl.gz")]
        texts.append(gzip.decompress((WORLD / "msc_self_instruct_train.jsonl.gz").read_bytes()).decode("utf-8"))
    elif split == "validation":
        texts += iter_texts(WORLD / "pretrain_validation.jsonl.gz")
        texts += [chat(r) for r in read_instructions(WORLD / "instructions_validation.jsonl")]
        texts.append((WORLD / "streamingqa_validation.csv").read_text(encoding="utf-8"))
    else:
        texts.append((WORLD / "streamingqa_test.csv").read_text(encoding="utf-8"))
        texts.append((WORLD / "msc_self_instruct_test.jsonl").read_text(encoding="utf-8"))
    return words_in(texts)


def test_no_validation_or_test_entity_in_training_files():
    entities = json.loads((WORLD / "entities.json").read_text(encoding="utf-8"))["splits"]
    name_words = {}
    for split, names in entities.items():
        # name_words are the surnames and the invented words of organisations and events
        assert {n.split()[-1] for n in names["people"]} | {n.split()[0] for n in names["organisations"]} \
            | {n.split()[0] for n in names["events"]} == set(names["name_words"])
        name_words[split] = set(names["name_words"])
    assert not name_words["train"] & name_words["validation"]
    assert not name_words["train"] & name_words["test"] and not name_words["validation"] & name_words["test"]

    written = {split: split_words(split) for split in ("train", "validation", "test")}
    assert len(name_words["test"] & written["test"]) > 0.9 * len(name_words["test"])  # the check is not vacuous
    assert not written["train"] & (name_words["validation"] | name_words["test"])
    assert not written["validation"] & name_words["test"]
    people = entities["test"]["people"] + entities["validation"]["people"]
    train_text = " ".join(iter_texts(WORLD / "pretrain_train.jsonl.gz"))
    assert not any(name in train_text for name in people[:50])


def test_fresh_worlds_for_the_base_name_nothing_of_the_files():
    fresh = fresh_worlds.FreshWorlds()
    entities = json.loads((WORLD / "entities.json").read_text(encoding="utf-8"))["splits"]
    committed = set().union(*(set(names["name_words"]) for names in entities.values()))
    drawn = [fresh.text(str(i), library=i % 2 == 0) for i in range(30)]
    records = [fresh.instruction(str(i)) for i in range(200)]
    drawn += [" ".join([r["context"], r["prompt"], r["answer"], *(q + " " + a for q, a in r["follow_ups"])])
              for r in records]
    kinds = [r["kind"] for r in records]
    assert all(abs(kinds.count(kind) / len(kinds) - share) < 0.06 for kind, share in fresh_worlds.MIX.items())
    assert sum(len(r["follow_ups"]) for r in records) > 60  # QA records ask several questions
    assert not words_in(drawn) & committed
    assert fresh.text("7") == fresh_worlds.FreshWorlds().text("7")  # a function of the key
    assert fresh.instruction("7") == fresh_worlds.FreshWorlds().instruction("7")
    assert fresh.text("7") != fresh.text("8")
    assert len(words_in(drawn) - words_in(split_words("train"))) > 100  # new names all the time


def test_fresh_record_kinds():
    fresh = fresh_worlds.FreshWorlds()
    library = {e.name for e in fresh.asked + fresh.held_out}
    held_out = {e.name for e in fresh.held_out}
    for kind in ("qa", "fewshot", "dialogue", "lookup"):
        for r in fresh.validation(kind, 40):
            assert r["kind"] == kind and r["context"]
            assert not any(name in r["context"] + r["prompt"] for name in library)  # the library stays apart
            if kind in ("fewshot", "lookup"):  # demonstrations and the query, as evaluate.py shows MetaICL
                demos = r["context"].split("\n\n")
                assert all(re.fullmatch(r"Input: [^\n]+\nOutput: [^\n]+", d) for d in demos)
                assert re.fullmatch(r"Input: [^\n]+\nOutput:", r["prompt"])
                if kind == "lookup":  # 2-12 demonstrations, one of which shows the query's label
                    assert 2 <= len(demos) <= 12 and any(d.endswith(f"\nOutput: {r['answer']}") for d in demos)
            else:  # the answer is in the context; in a dialogue, in a line of Speaker 1
                lines = r["context"].split("\n") if kind == "dialogue" else [r["context"]]
                assert any(r["answer"] in line and (kind == "qa" or line.startswith("Speaker 1: "))
                           for line in lines), r
    for r in fresh.validation("closed_book", 40):  # no context, about the library's held-out half
        assert r["context"] == "" and any(name in r["prompt"] for name in held_out)
    trained = [fresh.record("closed_book", make_world.random.Random(i)) for i in range(300)]
    assert not any(name in r["prompt"] for r in trained for name in held_out)  # never asked in training
    assert all(any(name in r["prompt"] for name in library) for r in trained)
    texts = " ".join(fresh.text(str(i), library=True) for i in range(20))
    assert sum(name in texts for name in held_out) > len(held_out) / 2  # the held-out half is read about
    with pytest.raises(ValueError, match="record kind 'text': expected one of"):
        fresh.record("text", make_world.random.Random(0))


def test_invented_tasks_are_never_the_metaicl_test_tasks():
    fresh = fresh_worlds.FreshWorlds()
    world = fresh.world
    train_tasks, test_tasks = make_world.build_tasks(world, 0)
    test_labels = {label.lower() for t in test_tasks for label in t.options}
    assert not test_labels & {label.lower() for label in fresh_worlds.LABELS}
    assert test_labels & {w.lower() for w in world.label_words} <= fresh.taken  # never invented either
    people = world.splits["test"].people[:10]
    name_swap = next(t for t in test_tasks if t.name == "name_swap")
    same = [name_swap.example(p) for p in people]
    assert fresh_worlds.computes_a_test_task(same, people, test_tasks)  # the check sees a copy
    other = [(x, y + "!") for x, y in same]
    assert not fresh_worlds.computes_a_test_task(other, people, test_tasks)
    labels, formats = set(), set()
    for i in range(300):
        rng = make_world.random.Random(f"test/{i}")
        task, examples = fresh.invented_task(world, make_world.NameMaker(rng), rng, "people", people)
        assert not fresh_worlds.computes_a_test_task(examples, people, test_tasks)
        (labels.update(task.options) if task.options else formats.add(re.sub(r"\w+", "w", examples[0][1])))
    assert not {label.lower() for label in labels} & test_labels
    assert len(labels) > 40 and len(formats) > 15  # many tasks, not a few


def test_invented_labels_share_and_case():
    """invented_labels: the share of invented classification labels that are invented words (the
    rest common words, LABELS); lower_labels: the share of classifications whose labels are
    written in lower case."""
    fresh = fresh_worlds.FreshWorlds()
    common = {w.lower() for w in fresh_worlds.LABELS}

    def tasks(share: float, lower: float) -> list:
        drawn = []
        for i in range(400):
            rng = make_world.random.Random(f"labels/{i}")
            drawn.append(fresh_worlds.invent_task(fresh.world, make_world.NameMaker(rng, fresh.taken), rng, "people",
                                                  share, lower))
        return [task.options for task in drawn if task.options]

    for share, lower in ((0.3, 0.0), (1.0, 0.5)):
        labels = [label for options in tasks(share, lower) for label in options]
        invented = sum(label.lower() not in common for label in labels) / len(labels)
        assert abs(invented - share) < 0.06, (share, invented)
        cases = [all(label == label.lower() for label in options) for options in tasks(share, lower)
                 if any(label.lower() not in common for label in options)]  # common words are lower case
        assert abs(sum(cases) / len(cases) - lower) < 0.08, (lower, sum(cases) / len(cases))
    rng = make_world.random.Random("labels/common")
    assert len(set(fresh_worlds.LABELS)) == len(fresh_worlds.LABELS)
    first = fresh_worlds.LABELS[:fresh_worlds.COMMON_LABELS]
    assert all(fresh_worlds.label_word(make_world.NameMaker(rng), rng, 0.0) in first for _ in range(50))
    every_word = {fresh_worlds.label_word(make_world.NameMaker(rng), rng, 0.0, len(fresh_worlds.LABELS))
                  for _ in range(2000)}
    assert every_word <= set(fresh_worlds.LABELS) and len(every_word - set(first)) > 150  # the words past the first
    # the shares reach the records' tasks
    every = fresh_worlds.FreshWorlds(invented_labels=1.0, lower_labels=1.0)
    people = every.world.splits["test"].people[:6]
    drawn = [every.invented_task(every.world, make_world.NameMaker(rng, every.taken), rng, "people", people)[0]
             for _ in range(60)]
    assert all(label.lower() not in common and label == label.lower() for task in drawn for label in task.options)
    assert any(task.options for task in drawn)
    many = fresh_worlds.FreshWorlds(invented_labels=0.0, common_labels=len(fresh_worlds.LABELS))
    drawn = [many.invented_task(many.world, make_world.NameMaker(rng, many.taken), rng, "people", people)[0]
             for _ in range(60)]
    assert {label for task in drawn for label in task.options} - common  # --common_labels reaches the records


def test_invented_phrasing_is_the_tasks_own():
    """invented_phrasing: a share of the invented tasks state their inputs with every plain word of
    the fact sentences replaced by an invented word, one mapping per task (so the demonstrations
    show where a fact is), drawn from the record's key like every other choice."""
    fresh = fresh_worlds.FreshWorlds()
    people = fresh.world.splits["test"].people[:8]
    trained = set(fresh_worlds.PHRASE_WORDS["people"])
    assert {"born", "works", "for", "employed"} <= trained and not trained & {"a_job", "job", "Subj", "org", "country"}

    def tasks(phrasing: float) -> list[list[str]]:  # the inputs of 200 tasks on `people`
        drawn = []
        for i in range(200):
            rng = make_world.random.Random(f"phrasing/{i}")
            task = fresh_worlds.invent_task(fresh.world, make_world.NameMaker(rng, fresh.taken), rng, "people",
                                            0.3, 0.0, phrasing=phrasing)
            drawn.append([task.example(e)[0] for e in people])
        return drawn

    slots = {w for e in people for w in e.job.split()} | {"a", "an", "s", "he", "she", "his", "her",
                                                          "husband", "wife", "brother", "sister"}

    def plain(inputs: list[str]) -> set[str]:  # the lower-case words not from a slot ({a_job}, {Poss}, ...)
        return {w for x in inputs for w in re.findall(r"\b[a-z]+\b", x)} - slots

    assert all(plain(inputs) <= trained for inputs in tasks(0.0))
    phrased = tasks(1.0)
    assert all(not plain(inputs) & trained for inputs in phrased)
    assert tasks(1.0) == phrased  # a function of the key
    assert len({frozenset(plain(inputs)) for inputs in phrased}) > 150  # a phrasing per task, not one for all
    assert all(len(plain(inputs)) <= len(trained) for inputs in phrased)  # one word for each, all the task through
    rng = make_world.random.Random("phrasing/words")
    words = fresh_worlds.invented_phrasing("people", make_world.NameMaker(rng, fresh.taken))
    assert words.keys() == trained and len(set(words.values())) == len(words) and not set(words.values()) & trained
    for facts in (["employer"], ["birth_city", "birth_year"], ["job", "employer"]):  # the sentence, its words swapped
        for i, e in enumerate(people):
            said = fresh_worlds.input_sentence(fresh.world, e, facts, make_world.random.Random(i))
            swapped = re.sub(r"\b[a-z]+\b", lambda m: m[0] if m[0] in slots else words.get(m[0], m[0]), said)
            assert fresh_worlds.input_sentence(fresh.world, e, facts, make_world.random.Random(i), words) == swapped
    half = tasks(0.5)
    share = sum(not plain(inputs) & trained for inputs in half) / len(half)
    assert 0.4 < share < 0.6, share
    rng = make_world.random.Random("phrasing/records")
    every = fresh_worlds.FreshWorlds(invented_phrasing=1.0)  # the share reaches the records' tasks
    inputs = [x for _ in range(20) for x, _ in every.invented_task(every.world, make_world.NameMaker(rng, every.taken),
                                                                   rng, "people", people)[1]]
    assert not plain(inputs) & trained



def test_many_documents_share_of_question_answering_records():
    def documents(fresh):  # per record, the documents of its context (one paragraph each)
        return [fresh.record("qa", make_world.random.Random(f"many/{i}"))["context"].count("\n\n") + 1
                for i in range(200)]
    every, half, none = (documents(fresh_worlds.FreshWorlds(many_documents=share)) for share in (1.0, 0.5, 0.0))
    assert set(every) == set(range(fresh_worlds.MANY_DOCUMENTS[0], fresh_worlds.MANY_DOCUMENTS[1] + 1))
    assert set(none) == {1, 2, 3} and 0.4 < none.count(1) / 200 < 0.8  # half of them one easy document
    assert none.count(1) / 200 - 0.35 < half.count(1) / 200 < none.count(1) / 200 - 0.1


def test_binding_records_ask_about_a_value_and_by_it():
    binding = fresh_worlds.FreshWorlds(binding=1.0)
    records = [binding.record("qa", make_world.random.Random(f"binding/{i}")) for i in range(200)]
    by_value = 0
    for r in records:
        sentences = re.split(r"(?<=\.) (?=[A-Z])", r["context"])
        assert fresh_worlds.BINDING_PEOPLE[0] <= len(sentences) <= fresh_worlds.BINDING_PEOPLE[1]
        turns = [(r["prompt"], r["answer"]), *r["follow_ups"]]
        assert 1 <= len(turns) <= 4 and len({q for q, _ in turns}) == len(turns)
        for question, answer in turns:  # the answer is in exactly one sentence: values differ, names too
            assert sum(bool(re.search(rf"\b{re.escape(answer)}\b", s)) for s in sentences) == 1, (question, answer)
            by_value += question.startswith(("Who ", "Which person"))
    n = sum(1 + len(r["follow_ups"]) for r in records)
    assert 0.35 < by_value / n < 0.65  # asked by the value about half the time
    # a share of 0.5: the same draws, each a binding record (the same one) or a record as before
    half = fresh_worlds.FreshWorlds(binding=0.5)
    drawn = [half.record("qa", make_world.random.Random(f"binding/{i}"))["context"] for i in range(200)]
    assert 0.35 < sum(c == r["context"] for c, r in zip(drawn, records)) / 200 < 0.65


def test_ladder_rungs():
    ladder = make_world.Ladder()
    entities = json.loads((WORLD / "entities.json").read_text(encoding="utf-8"))["splits"]
    records = {(rung, split): [ladder.record(rung, split, str(i)) for i in range(120)]
               for rung in ladder.RUNGS for split in ("train", "validation")}
    for (rung, split), rows in records.items():
        if rung == "fewshot":  # the demonstrations show the task; the query's answer is not among them
            continue
        assert all(r["answer"] in r["context"] for r in rows if "\nOutput:" not in r["prompt"]), rung
        others = set().union(*(set(entities[s]["name_words"]) for s in make_world.SPLITS if s != split))
        assert not words_in(r["context"] + " " + r["prompt"] for r in rows) & others, (rung, split)
    fact = records["fact", "train"]
    assert all(r["context"].count(". ") == 0 for r in fact)  # one sentence
    # pairs: two sentences, the other one of the asked kind too (the recall probe's count of such facts)
    pure = make_world.Ladder(replay=0)
    assert all(pure.record("pairs", "train", str(i))["context"].count(". ") == 1 for i in range(40))
    split, rng = pure.world.splits["train"], make_world.random.Random(0)
    assert all(pure._facts(split, rng, people=2, facts=1, kind=kind)[1] == 1
               for kind in make_world.LADDER_FACTS for _ in range(10))
    assert ladder.record("people", "train", "3") == make_world.Ladder().record("people", "train", "3")
    # only the context holds the values: they are drawn anew, not the person's facts in the world
    asked = [r for r in fact if r["prompt"].startswith("Where was ")]
    true = [ladder.world.people[r["prompt"].removeprefix("Where was ").removesuffix(" born?")].birth_city
            for r in asked]
    assert len(asked) > 5 and sum(t == r["answer"] for t, r in zip(true, asked)) < len(asked) / 3
    words = {rung: sum(len(r["context"].split()) for r in records[rung, "train"]) / 120 for rung in ladder.RUNGS}
    assert words["fact"] < words["people"] < words["documents"] < words["streams"]
    assert words["streams"] > 150  # several 64-token windows
    # a quarter of a rung's records replay the rungs below it
    replayed = sum(len(r["context"].split()) < 60 for r in records["streams", "train"]) / 120
    assert 0.1 < replayed < 0.4
    # ... and the rungs climbed before it; rungs below that were climbed change nothing
    after_dialogue = [ladder.record("people", "train", str(i), climbed=("dialogue", "fact")) for i in range(120)]
    assert 0.03 < sum(r["context"].startswith("Speaker ") for r in after_dialogue) / 120 < 0.25
    assert [ladder.record("documents", "train", str(i), climbed=("fact", "people")) for i in range(120)] == \
        records["documents", "train"]
    validation = ladder.world.splits["validation"]
    examples = [{t.example(e) for e in getattr(validation, t.pool)} for t in make_world.build_tasks(ladder.world, 0)[0]]
    fewshot = [r for r in records["fewshot", "validation"] if r["prompt"].endswith("\nOutput:")]
    assert len(fewshot) > 80
    for r in fewshot:  # demonstrations and query of one train task, on validation entities
        pairs = {tuple(d.removeprefix("Input: ").split("\nOutput: ")) for d in r["context"].split("\n\n")}
        pairs.add((r["prompt"].removeprefix("Input: ").removesuffix("\nOutput:"), r["answer"]))
        assert len(pairs) >= 5 and any(pairs <= task for task in examples)
    no_replay = make_world.Ladder(replay=0.0)
    tasks = [no_replay.record("tasks", "train", str(i)) for i in range(60)]
    assert all(r["prompt"].endswith("\nOutput:") for r in tasks)
    assert not words_in(r["context"] + " " + r["prompt"] for r in tasks) & set().union(
        *(set(entities[s]["name_words"]) for s in make_world.SPLITS))  # invented entities, no split's
    assert len({re.sub(r"\w+", "w", r["answer"]) for r in tasks}) > 10  # a task of its own in each record
    assert ladder.record("tasks", "train", "7") != ladder.record("tasks", "validation", "7")
    train_users = {json.dumps(u["previous_dialogs"]) for u in map(json.loads, gzip.open(
        WORLD / "msc_self_instruct_train.jsonl.gz", "rt", encoding="utf-8"))}
    dialogue = [r for r in records["dialogue", "train"] if r["context"].startswith("Speaker ")]
    assert len(dialogue) > 70 and all(r["prompt"].endswith("?") for r in dialogue)
    assert all(any(r["context"].split("\n")[0].removeprefix("Speaker 1: ").removeprefix("Speaker 2: ") in u
                   for u in train_users) for r in dialogue[:10])  # the train file's users
    with pytest.raises(ValueError, match="ladder rung 'essays': expected one of"):
        ladder.record("essays", "train", "0")


def test_ladder_alike_rung_states_the_asked_kind_for_every_person():
    """Rung "alike": 2-4 documents about people with random facts, each stating the fact asked."""
    ladder = make_world.Ladder(replay=0.0)
    world, split = ladder.world, ladder.world.splits["train"]
    for i in range(40):
        rng = random.Random(i)
        document = make_world.write_document(world, split, rng.choice(split.people), "news", rng, states="job")
        assert any(p.startswith("What does ") for phrasings, _ in document.questions for p in phrasings)
    records = [ladder.record("alike", "train", str(i)) for i in range(80)]
    true = 0
    for r in records:
        documents = r["context"].split("\n\n")
        assert 2 <= len(documents) <= 4 and r["answer"] in r["context"]
        named = [p for p in split.people if p.name in r["prompt"]]
        assert len(named) == 1 and sum(named[0].name in d for d in documents) >= 1
        facts = make_world.facts_of(world, named[0])
        true += any(r["answer"] in answers for _, answers in facts.values())
    assert true < len(records) / 3  # the values are drawn anew, not the world's
    years = [r for r in records if r["prompt"].startswith(("When was", "In what year", "What year"))]
    assert years and all(len(re.findall(r"\b(?:19|20)\d\d\b", r["context"])) >= len(r["context"].split("\n\n"))
                         for r in years)


# -----------------------------------------------------------------------------
# Reader errors

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_iter_texts_errors(tmp_path):
    bad = write(tmp_path / "a.jsonl", '{"text": "fine"}\n{"meta": {}}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: missing field 'text'"):
        list(iter_texts(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        iter_texts(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .jsonl"):
        iter_texts(tmp_path / "empty")
    (tmp_path / "dir").mkdir()
    with gzip.open(tmp_path / "dir" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped"}\n')
    write(tmp_path / "dir" / "a.jsonl", '{"text": "plain"}\n')
    assert list(iter_texts([tmp_path / "dir"])) == ["plain", "zipped"]


def test_unreadable_files(tmp_path):
    zipped = gzip.compress(b'{"text": "zipped"}\n' * 200)
    (tmp_path / "cut.jsonl.gz").write_bytes(zipped[:len(zipped) // 2])
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "not zipped"}\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    for name, message in [("cut.jsonl.gz", r"cut\.jsonl\.gz:\d+: unreadable \(Compressed file ended"),
                          ("plain.jsonl.gz", r"plain\.jsonl\.gz:1: unreadable \(Not a gzipped file"),
                          ("latin1.jsonl", r"latin1\.jsonl:1: unreadable \('utf-8' codec can't decode")]:
        with pytest.raises(ValueError, match=message):
            list(iter_texts(tmp_path / name))
    (tmp_path / "q.csv").write_bytes("text,question,answers\ncaf\u00e9,q,a\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"q\.csv: unreadable .*; expected UTF-8 text"):
        read_streamingqa(tmp_path / "q.csv")


def test_streamingqa_errors(tmp_path):
    path = write(tmp_path / "q.csv", "text,query,answers\ndoc,q,a\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) question; columns found: text, query, answers"):
        read_streamingqa(path)
    path = write(tmp_path / "q.csv", 'text,question,answers\ndoc,q,a\\b\ndoc,q2,"\\ "\n')
    with pytest.raises(ValueError, match=r"q\.csv: row 2 .*'answers' is empty"):
        read_streamingqa(path)
    path = write(tmp_path / "q.csv", "text,question,answers\ndoc,q,\n")
    with pytest.raises(ValueError, match="row 1 .*'answers' is empty"):
        read_streamingqa(path)


def test_metaicl_errors(tmp_path):
    with pytest.raises(ValueError, match="field 'test' should be a list of task names"):
        read_metaicl_config(write(tmp_path / "config" / "c.json", '{"train": ["a"]}'))
    write(tmp_path / "alpha" / "alpha_16_13_train.jsonl", '{"task": "alpha", "input": "x", "options": []}\n')
    write(tmp_path / "beta" / "beta_16_13_train.jsonl",
          '{"task": "beta", "input": "x", "output": "c", "options": ["a", "b"]}\n')
    with pytest.raises(FileNotFoundError, match="no task 'gamma'; tasks found: alpha, beta"):
        read_metaicl(tmp_path, "gamma", 16, 13, "train")
    with pytest.raises(ValueError, match=r"alpha_16_13_train\.jsonl:1: missing field 'output'"):
        read_metaicl(tmp_path, "alpha", 16, 13, "train")
    with pytest.raises(ValueError, match="'output' 'c' is not one of 'options'"):
        read_metaicl(tmp_path, "beta", 16, 13, "train")
    with pytest.raises(FileNotFoundError, match="files for task 'beta': beta_16_13_train.jsonl"):
        read_metaicl(tmp_path, "beta", 16, 42, "test")


def msc_line(**changes) -> str:
    record = {"previous_dialogs": [{"dialog": [{"id": "Speaker 1", "text": "I have a dog named Tovi."},
                                               {"id": "Speaker 2", "text": "Nice!"}]}],
              "self_instruct": {"B": "What is the name of my dog?", "A": "Tovi"}} | changes
    return json.dumps(record) + "\n"


def test_msc_errors(tmp_path):
    assert read_msc(write(tmp_path / "m.jsonl", msc_line()))[0].previous_dialogs == [
        [("Speaker 1", "I have a dog named Tovi."), ("Speaker 2", "Nice!")]]
    with pytest.raises(ValueError, match=r"m\.jsonl:2: missing field 'self_instruct.B'"):
        read_msc(write(tmp_path / "m.jsonl", msc_line() + msc_line(self_instruct={"A": "Tovi"})))
    with pytest.raises(ValueError, match=r"m\.jsonl:1: field 'self_instruct.A' \(the answer\) is empty"):
        read_msc(write(tmp_path / "m.jsonl", msc_line(self_instruct={"B": "q", "A": " "})))
    with pytest.raises(ValueError, match=r"m\.jsonl:1: missing field 'previous_dialogs'"):
        read_msc(write(tmp_path / "m.jsonl", json.dumps({"self_instruct": {"A": "a", "B": "b"}}) + "\n"))
    bad_turn = [{"dialog": [{"id": "User", "text": "hi"}]}]
    with pytest.raises(ValueError, match=r"previous_dialogs\[0\]\.dialog\[0\] should be"):
        read_msc(write(tmp_path / "m.jsonl", msc_line(previous_dialogs=bad_turn)))


def test_instruction_errors(tmp_path):
    with pytest.raises(ValueError, match=r"i\.jsonl:1: missing field 'prompt'"):
        read_instructions(write(tmp_path / "i.jsonl", '{"context": "c", "answer": "a"}\n'))
    with pytest.raises(ValueError, match=r"i\.jsonl:1: field 'answer' is empty"):
        read_instructions(write(tmp_path / "i.jsonl", '{"context": "c", "prompt": "p", "answer": ""}\n'))
    with pytest.raises(ValueError, match=r"i\.jsonl:1: invalid JSON"):
        read_instructions(write(tmp_path / "i.jsonl", '{"context": \n'))


# -----------------------------------------------------------------------------
# The tokenizer

def test_tokenizer():
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() == 4096
    texts = list(iter_texts(WORLD / "pretrain_validation.jsonl.gz"))[:50]
    texts += [chat(r) for r in read_instructions(WORLD / "instructions_validation.jsonl")]
    texts += [r.document for r in read_streamingqa(WORLD / "streamingqa_test.csv")[:100]]
    texts += ["Ünïcode — 12345\n\n  two  spaces\ttab"]  # byte fallback and no normalisation
    for text in texts:
        assert sp.decode(sp.encode(text)) == text
    assert "INST" in sp.encode("[INST] hi [/INST]", out_type=str)
    assert all(sum(c.isdigit() for c in piece) <= 1 for piece in sp.encode("born in 1962", out_type=str))


# -----------------------------------------------------------------------------
# The committed tiny base (and generator)

def test_tiny_checkpoint_loads_and_round_trips():
    import torch
    from model import load
    model, tokenizer = load(ROOT / "data" / "tiny")
    assert model.args.model_type == "mistral" and model.args.n_kv_heads < model.args.n_heads
    assert model.args.max_seq_len == 256 and tokenizer.template == "mistral"
    text = next(iter_texts(WORLD / "pretrain_validation.jsonl.gz"))[:2000]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    with torch.no_grad():
        logits = model(torch.tensor([ids[:200]]))
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:200]))
    assert loss < 2.5  # it models the world's text (a random model: ln 4096 = 8.3)


def test_tiny_generator_loads_and_injects_a_document():
    # the committed generator belongs to the committed base, and a document streamed through it
    # lowers the base's loss on the answer to a question about it (the context not in the prompt)
    import torch
    from generator import AdapterGenerator, merged
    from model import chat_example, context_ids, load
    model, tokenizer = load(ROOT / "data" / "tiny")
    generator = AdapterGenerator.load(ROOT / "data" / "tiny" / "generator", model.args)
    records = list(read_instructions(WORLD / "instructions_validation.jsonl"))[:32]
    losses = {"alone": 0.0, "adapter": 0.0}
    with torch.no_grad():
        for r in records:
            ids, targets = map(torch.tensor, chat_example(tokenizer, r.prompt, r.answer))
            state = generator.contextualize(model, context_ids(tokenizer, r.context))
            for name, context in (("alone", torch.no_grad()), ("adapter", merged(model, generator.lora(state)))):
                with context:
                    logits = model(ids[None])[0]
                losses[name] += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100))
    assert losses["adapter"] < 0.9 * losses["alone"]
