"""Fresh worlds: the endless training data of the tiny base model (data/make_base.py).

The base must be able to use each benchmark's kind of context, yet know none of the facts that
the adapter generator is later trained or evaluated on. So it never reads data/world/: every draw
invents a small split of new people, organisations and events on the committed world's geography,
named with words that no committed file uses, and writes one of these records about it:

  text          documents of one style (the language-model loss alone teaches look-up: the
                split is small, so a later document restates facts of an earlier one);
  qa            a question about 1-3 documents in the prompt (reading comprehension);
  fewshot       demonstrations of a task invented on the spot, then a query (in-context learning:
                with thousands of distinct tasks and arbitrary labels, recognising a task cannot
                work, reading its demonstrations can; Raventos et al. 2023, Chan et al. 2022);
  dialogue      a chat session in which Speaker 1 states facts about themself, then a question
                about one of them (dialogue memory, as in MSC-Self-Instruct);
  closed_book   a question about an entity of the *library*, with no context;
  lookup        (make_base.py --lookup_rows) few-shot records of a classification whose
                query's key is among the demonstrations' (the bursty contexts that in-context
                look-up needs, Chan et al. 2022; evaluate.py's look-up probe draws them too).

The library is one fixed fresh split that the base reads about in text windows all through
training and is asked about without context for its first half only. Mixed training of this kind
(text about every entity, questions about some) is what makes facts stored in the weights
extractable for the others (Allen-Zhu and Li 2023, "Physics of Language Models: Part 3.1"), and
test-time fine-tuning, which stores a document in the weights, needs exactly that.

The MetaICL test tasks of data/world/ stay unseen: invented tasks draw their labels from words
that no test task uses and never compute a test task's output (tests/test_data.py checks both).
Every record is a function of its key.
"""

import random
import re
from dataclasses import replace

from data.make_world import (EVENT_KINDS, EVENT_SENTENCES, JOBS, LADDER_FACTS, ORG_SENTENCES, PERSON_SENTENCES,
                             RANDOM_YEARS, STYLES, Event, NameMaker, Organisation, Person, Split, Task, World,
                             WorldConfig, build_split, build_tasks, build_world, dialogue_text, documents_about,
                             fact_slots, facts_of, fewshot_context, fewshot_query, msc_user, name_words, pick_entity,
                             reserved_words, short_name, subject_slots, write_document)

KINDS = ("text", "qa", "fewshot", "dialogue", "closed_book", "lookup")
# Shares of the instruction records (every kind but text); text windows are drawn separately.
MIX = {"qa": 0.45, "fewshot": 0.30, "dialogue": 0.15, "closed_book": 0.10}
# The base stage starts on this mix: reading a context appears first in question answering, and
# the other kinds build on it (with MIX from the start, exact match with the document in the
# prompt was 3% after 1,000 steps, against 23% after 800 for a mix of 85% QA).
READING_MIX = {"qa": 0.85, "fewshot": 0.05, "dialogue": 0.05, "closed_book": 0.05}
# The base stage's last phase draws by this mix: in-context learning of invented tasks is the
# slowest skill to come (exact match on fresh few-shot records was 36% after 9,000 steps of MIX,
# and still rising).
ICL_MIX = {"qa": 0.30, "fewshot": 0.50, "dialogue": 0.10, "closed_book": 0.10}
MANY_DOCUMENTS = (2, 4)  # the documents of a many-document QA record (FreshWorlds.many_documents)
BINDING_PEOPLE = (2, 6)  # the people of a binding record (FreshWorlds.binding)
# A binding record's questions asked by the value: whose fact it is.
REVERSE_QUESTIONS = {"birth_city": ("Who was born in {city}?", "Which person is a native of {city}?"),
                     "birth_year": ("Who was born in {year}?", "Which person was born in the year {year}?"),
                     "job": ("Who works as {a_job}?", "Which person is {a_job} by trade?"),
                     "employer": ("Who works for {org}?", "Which person is employed by {org}?")}

# Label words of invented classification tasks: common words, none a label of a MetaICL test task
# (those are checked against build_tasks' test tasks, with the world's invented label words). A task
# draws from the first COMMON_LABELS of them (make_base.py --common_labels): a base that saw few
# label words answers with them (`negative` for a query of `job_to_shift`, whose labels are `day`,
# `night` and `rotating`); many, and only the demonstrations can say which are the task's.
LABELS = ("yes", "no", "true", "false", "high", "low", "left", "right", "red", "blue", "green", "gold",
          "silver", "cold", "warm", "big", "small", "up", "down", "good", "bad", "first", "second", "third",
          "alpha", "beta", "gamma", "delta", "near", "far", "old", "new", "fast", "slow", "inner", "outer",
          "positive", "negative", "plus", "minus", "north", "south", "east", "west", "A", "B", "C", "D",
          "one", "two", "three", "four", "open", "closed", "light", "heavy", "calm", "loud", "odd", "even",
          "apple", "river", "stone", "glass", "paper", "metal", "wood", "silk", "iron", "copper", "amber",
          "ivory", "coral", "pearl", "ruby", "jade", "ash", "oak", "pine", "maple", "cedar", "birch", "willow",
          "rose", "lily", "tulip", "daisy", "fern", "moss", "reed", "wheat", "corn", "rice", "bean", "plum",
          "pear", "peach", "lemon", "lime", "mango", "melon", "grape", "cherry", "berry", "olive", "honey",
          "salt", "sugar", "pepper", "milk", "tea", "coffee", "dog", "fox", "wolf", "bear", "deer", "hawk",
          "owl", "crow", "swan", "duck", "goose", "horse", "mouse", "rabbit", "tiger", "lion", "eagle", "frog",
          "snake", "fish", "whale", "shark", "crab", "bee", "ant", "moth", "circle", "square", "point", "arc",
          "ring", "star", "cube", "cone", "wave", "quick", "soft", "hard", "sharp", "dull", "bright", "dark",
          "clear", "dim", "rough", "smooth", "thick", "thin", "wide", "narrow", "deep", "shallow", "rich",
          "poor", "sweet", "sour", "bitter", "fresh", "stale", "wet", "dry", "hot", "cool", "mild", "wild",
          "tame", "brave", "shy", "proud", "wise", "kind", "rare", "plain", "fancy", "simple", "strong", "weak",
          "full", "empty", "short", "long", "young", "tall", "flat", "round", "king", "queen", "knight",
          "castle", "tower", "bridge", "road", "gate", "door", "window", "table", "chair", "lamp", "clock",
          "bell", "drum", "flute", "harp", "piano", "violin", "pen", "ink", "map", "key", "lock", "box", "bag",
          "cup", "bowl", "plate", "fork", "knife", "spoon", "coin", "card", "dice", "ball", "kite", "boat",
          "ship", "wheel", "rope", "chain", "nail", "hammer", "brush", "comb", "mirror", "candle", "flame",
          "smoke", "snow", "ice", "fire", "water", "earth", "air", "sand", "mud", "hill", "lake", "sea",
          "island", "forest", "field", "garden", "farm", "village", "zero", "five", "six", "seven", "eight",
          "nine", "ten", "single", "double", "triple", "half", "whole", "major", "minor", "top", "bottom",
          "front", "back", "middle", "center", "edge", "start", "end", "stop", "go", "win", "lose", "pass",
          "fail", "accept", "reject", "on", "off", "in", "out", "over", "under", "above", "below", "inside",
          "outside", "maybe", "never", "always", "often")
COMMON_LABELS = 60  # how many of LABELS the tasks draw from (make_base.py --common_labels)
INVENTED_LABELS = 0.3  # the share of labels that are invented words instead (make_base.py --invented_labels)
# Words that prefix an invented free-form output ("Place: Tesk").
PREFIXES = ("Answer", "Place", "Year", "Name", "Code", "Tag", "Label", "Result", "Info", "Key", "Value",
            "Out", "Item", "Entry", "Record", "Note", "Field", "Data")
ONE_FIELD = ("{0}", "{P}: {0}", "{P} = {0}", "{P} - {0}", "({0})", "[{0}]", "{0} ({P})", "{P} {0}", "<{0}>")
TWO_FIELDS = ("{0}, {1}", "{0} ({1})", "{0} / {1}", "{0} - {1}", "{0}: {1}", "{P}: {0}, {1}", "{0} {1}",
              "{0} and {1}", "{0}; {1}", "{1} of {0}")
TRANSFORMS = {"same": lambda s: s, "upper": str.upper, "lower": str.lower, "initial": lambda s: s[0] + "."}

# What an invented task can read off an input, per pool: field -> (the fact the input must state,
# or None when the name holds it; the field's value).
FIELDS = {
    "people": {"first": (None, lambda p: p.first), "last": (None, lambda p: p.last),
               "name": (None, lambda p: p.name), "job": ("job", lambda p: p.job),
               "birth_city": ("birth_city", lambda p: p.birth_city),
               "birth_year": ("birth_year", lambda p: str(p.birth_year)),
               "employer": ("employer", lambda p: p.employer),
               "employer_word": ("employer", lambda p: short_name(p.employer))},
    "organisations": {"name": (None, lambda o: o.name), "word": (None, lambda o: short_name(o.name)),
                      "industry": ("industry", lambda o: o.industry), "hq": ("hq", lambda o: o.hq),
                      "founded": ("founded", lambda o: str(o.founded)), "founder": ("founder", lambda o: o.founder)},
    "events": {"name": (None, lambda e: e.name), "word": (None, lambda e: short_name(e.name)),
               "kind": (None, lambda e: e.kind), "city": ("city", lambda e: e.city),
               "year": ("year", lambda e: str(e.year))},
}
# Keys an invented classification task maps to labels: pool -> key -> (the fact stated, key value).
KEYS = {
    "people": {"job": ("job", lambda p: p.job), "birth_city": ("birth_city", lambda p: p.birth_city),
               "employer": ("employer", lambda p: p.employer)},
    "organisations": {"industry": ("industry", lambda o: o.industry), "hq": ("hq", lambda o: o.hq)},
    "events": {"kind": (None, lambda e: e.kind), "city": ("city", lambda e: e.city)},
}
YEARS = {"people": ("birth_year", lambda p: p.birth_year), "organisations": ("founded", lambda o: o.founded),
         "events": ("year", lambda e: e.year)}
POOLS = {"people": Person, "organisations": Organisation, "events": Event}
PLAIN_WORD = re.compile(r"(?<![\w{])[a-z]+(?![\w}])")  # a lower-case word of a template, not a {slot}
# The plain words of the sentences that state a pool's facts (an event's involvement comes from its
# kind's statements): what an invented phrasing replaces.
PHRASE_WORDS = {pool: sorted({m[0] for template in templates for m in PLAIN_WORD.finditer(template)})
                for pool, templates in {
                    "people": [t for ts in PERSON_SENTENCES.values() for t in ts],
                    "organisations": [t for ts in ORG_SENTENCES.values() for t in ts],
                    "events": [t for ts in EVENT_SENTENCES.values() for t in ts]
                    + [t for kind in EVENT_KINDS.values() for t in kind.statements]}.items()}
CUTS = {"people": (1955, 1990), "organisations": (1990, 2015), "events": (1970, 2010)}  # thresholds drawn from


def sentence_table(entity) -> dict:
    """The fact sentences of an entity's kind, keyed by the facts they state."""
    if isinstance(entity, Person):
        return PERSON_SENTENCES
    if isinstance(entity, Organisation):
        return ORG_SENTENCES
    return EVENT_SENTENCES | {("involved",): EVENT_KINDS[entity.kind].statements}


def input_sentence(world: World, entity, facts: list[str], rng: random.Random,
                   words: dict[str, str] | None = None) -> str:
    """One sentence per fact (a merged one where one exists), the entity named in the first;
    with no fact, one sentence stating a random fact (the input is about the name). words: an
    invented phrasing (invented_phrasing), each plain word of the sentences replaced by its own."""
    table, slots = sentence_table(entity), fact_slots(world, entity)
    if not facts:
        facts = [rng.choice([key[0] for key in table if len(key) == 1 and key[0] in facts_of(world, entity)])]
    merged = tuple(facts)
    keys = [merged] if merged in table else [(f,) for f in facts]
    say = lambda template: PLAIN_WORD.sub(lambda m: words.get(m[0], m[0]), template) if words else template
    return " ".join(say(rng.choice(table[key])).format(**slots, **subject_slots(entity, by_name=i == 0))
                    for i, key in enumerate(keys))


def invented_phrasing(pool: str, names: NameMaker) -> dict[str, str]:
    """An invented word for each plain word of the sentences stating `pool`'s facts (`Kule Shenam
    brofe tesk Thebous Partners.` for `Kule Shenam works for Thebous Partners.`): a task whose inputs
    are phrased so says where each fact is only through its demonstrations. The MetaICL test task
    `employer_tag` states employers as `is on the staff of`, a phrasing no training sentence has; a
    base that finds roles by their trained words fails it (README, the base study)."""
    return {word: names.word().lower() for word in PHRASE_WORDS[pool]}


def label_word(names: NameMaker, rng: random.Random, invented: float, common: int = COMMON_LABELS) -> str:
    """A label of an invented classification: one of the first `common` words of LABELS, or with
    chance `invented` an invented word."""
    return names.word() if rng.random() < invented else rng.choice(LABELS[:common])


def invent_task(world: World, names: NameMaker, rng: random.Random, pool: str, invented: float,
                lower: float, common: int = COMMON_LABELS, phrasing: float = 0.0) -> Task:
    """A MetaICL-style task invented on the spot about entities of `pool`: half classify (an
    arbitrary mapping of a key to 2-4 labels, a share `invented` of them invented words, the
    rest among the first `common` of LABELS, or a year threshold), half rewrite 1-2 fields of
    the input into an invented format. A share `lower` of the classifications write their
    labels in lower case (no draw at 0, so the records of a recipe without it stay the same):
    the test tasks' labels are lower-case words of 3-4 pieces (`r ain y`), which a base that saw
    invented labels only capitalised copied one piece short (`rain`, `wind`). A share `phrasing`
    state their inputs in an invented phrasing, drawn for the task (invented_phrasing; no draw at 0
    either)."""
    words = invented_phrasing(pool, names) if phrasing and rng.random() < phrasing else None
    stated = lambda e, facts: input_sentence(world, e, [f for f in facts if f], rng, words)
    if rng.random() < 0.5:
        case = str.lower if lower and rng.random() < lower else str
        labels = [case(label_word(names, rng, invented, common)) for _ in range(rng.randint(2, 4))]
        labels = list(dict.fromkeys(labels))
        if len(labels) < 2:
            labels.append(case(names.word()))
        if rng.random() < 0.25:  # a threshold on a year, within the pool's usual years
            fact, year = YEARS[pool]
            cut, (early, late) = rng.randint(*CUTS[pool]), rng.sample(labels, 2)
            return Task("invented", pool, [early, late],
                        lambda e: (stated(e, [fact]), early if year(e) < cut else late))
        key, (fact, value) = rng.choice(list(KEYS[pool].items()))
        mapping, order = {}, rng.sample(labels, len(labels))

        def label(e):  # key values get the labels in turn as they appear: every label is used
            return mapping.setdefault(value(e), order[len(mapping) % len(order)])
        return Task("invented", pool, labels, lambda e: (stated(e, [fact]), label(e)))
    fields = rng.sample(list(FIELDS[pool]), rng.choice((1, 1, 2)))
    pattern = rng.choice(ONE_FIELD if len(fields) == 1 else TWO_FIELDS)
    prefix = rng.choice(PREFIXES) if rng.random() < 0.6 else names.word()
    transforms = [rng.choice(list(TRANSFORMS)) if rng.random() < 0.3 else "same" for _ in fields]
    facts = list(dict.fromkeys(FIELDS[pool][f][0] for f in fields))
    extra = [f for f, _ in FIELDS[pool].values() if f and f not in facts]
    if extra and rng.random() < 0.5:  # a fact the output does not use
        facts.append(rng.choice(extra))

    def output(e) -> str:
        values = [TRANSFORMS[t](FIELDS[pool][f][1](e)) for f, t in zip(fields, transforms)]
        return pattern.replace("{P}", prefix).format(*values)
    return Task("invented", pool, [], lambda e: (stated(e, facts), output(e)))


def computes_a_test_task(examples: list[tuple[str, str]], entities: list, test_tasks: list[Task]) -> bool:
    """Whether the outputs of `examples` (on `entities`) are a test task's outputs on them."""
    outputs = [y for _, y in examples]
    return any(isinstance(entities[0], POOLS[t.pool]) and [t.example(e)[1] for e in entities] == outputs
               for t in test_tasks)


class FreshWorlds:
    """Records of every KIND about worlds invented on the spot (see the module's docstring)."""

    SIZES = (40, 20, 20)  # people, organisations, events of a fresh split for an instruction record
    TEXT_SIZES = (8, 4, 4)  # a text window's split: small, so its entities recur
    LIBRARY_SIZES = (64, 16, 16)  # the library; the first half of each list is asked about

    def __init__(self, config: WorldConfig = WorldConfig(), invented_labels: float = INVENTED_LABELS,
                 lower_labels: float = 0.0, common_labels: int = COMMON_LABELS, invented_phrasing: float = 0.0,
                 many_documents: float = 0.0, binding: float = 0.0):
        self.world, self.invented_labels, self.lower_labels = build_world(config), invented_labels, lower_labels
        self.common_labels, self.invented_phrasing = common_labels, invented_phrasing
        self.many_documents, self.binding = many_documents, binding
        w = self.world
        names = ([*w.cities, *w.cities.values(), *w.first_names, *w.pet_names, *w.label_words]
                 + [p.last for p in w.people.values()] + [n.split()[0] for n in [*w.organisations, *w.teams]]
                 + [e.name.split()[0] for s in w.splits.values() for e in s.events])
        labels = {label.lower() for label in LABELS[:common_labels]}  # the words in use: names drawn as before
        self.taken = reserved_words() | {name.lower() for name in names} | labels
        self.library_world, self.library = self._fresh(random.Random("fresh/library"), self.LIBRARY_SIZES)
        self.taken |= {word.lower() for word in name_words(self.library)}  # fresh splits never reuse them
        halves = lambda entities: (entities[:len(entities) // 2], entities[len(entities) // 2:])
        asked, held_out = zip(*map(halves, (self.library.people, self.library.organisations, self.library.events)))
        self.asked, self.held_out = [e for part in asked for e in part], [e for part in held_out for e in part]
        self.test_tasks = build_tasks(w, config.seed)[1]

    def _names(self, rng: random.Random) -> NameMaker:
        """A maker of words that no committed file and no library name uses."""
        return NameMaker(rng, self.taken)

    def _fresh(self, rng: random.Random, sizes: tuple[int, int, int]) -> tuple[World, Split]:
        split = build_split(self._names(rng), self.world.first_names, list(self.world.cities), sizes, rng)
        w = self.world
        return World(w.cities, {"fresh": split}, w.first_names, w.pet_names, w.teams, w.label_words), split

    def text(self, key: str, library: bool = False, min_words: int = 220) -> str:
        """Documents of one style about a small fresh split (or the library), joined by blank
        lines, at least min_words."""
        rng = random.Random(f"fresh/text/{library}/{key}")
        world, split = (self.library_world, self.library) if library else self._fresh(rng, self.TEXT_SIZES)
        style, documents, words = rng.choice(list(STYLES)), [], 0
        while words < min_words:
            documents.append(write_document(world, split, pick_entity(split, rng), style, rng).text)
            words += len(documents[-1].split())
        return "\n\n".join(documents)

    def instruction(self, key: str, mix: dict[str, float] = MIX) -> dict:
        """A record {"kind", "context", "prompt", "answer", "follow_ups": [(prompt, answer), ...]}
        of a kind drawn by `mix` (context "" for closed_book)."""
        rng = random.Random(f"fresh/instruction/{key}")
        roll, kind = rng.random(), None
        for kind, share in mix.items():
            roll -= share
            if roll < 0:
                break
        return self.record(kind, rng)

    def record(self, kind: str, rng: random.Random, held_out: bool = False) -> dict:
        """A record of one kind; held_out: a closed-book question about the library's second half
        (never asked in training: what validation measures)."""
        if kind == "closed_book":
            entity = rng.choice(self.held_out if held_out else self.asked)
            facts = list(facts_of(self.library_world, entity).values())
            return self._turns("closed_book", "", rng.sample(facts, min(len(facts), rng.randint(1, 3))), rng)
        if kind == "lookup":  # a few-shot record whose query's key is among its 2-12 demonstrations'
            r = self._lookup(rng, rng.randint(2, 12), repeat=False)
            return {"kind": "lookup", "context": fewshot_context(r["demos"]), "prompt": fewshot_query(r["query"]),
                    "answer": r["answer"], "follow_ups": []}
        world, split = self._fresh(rng, self.SIZES)
        if kind == "qa":
            # no draw at share 0: the defaults' records, and the bundled base's rebuild, stay as they were
            if self.binding and rng.random() < self.binding:
                return self._binding(world, split, rng)
            if self.many_documents and rng.random() < self.many_documents:
                easy, n = False, rng.randint(*MANY_DOCUMENTS)
            else:
                easy = rng.random() < 0.5  # one document, no distractor: how a small model first learns look-up
                n = 1 if easy else rng.randint(1, 3)
            documents = documents_about(world, split, n, rng, distractors=not easy)
            facts = [fact for d in documents for fact in d.questions]
            return self._turns("qa", "\n\n".join(d.text for d in documents),
                               rng.sample(facts, min(len(facts), rng.randint(1, 4))), rng)
        if kind == "fewshot":
            return self._fewshot(world, split, rng)
        if kind == "dialogue":
            return self._dialogue(world, rng)
        raise ValueError(f"record kind '{kind}': expected one of {list(KINDS[1:])}")

    def validation(self, kind: str, n: int) -> list[dict]:
        """n records of a kind for validation (keys no training draw uses; closed_book about the
        library's held-out half)."""
        return [self.record(kind, random.Random(f"fresh/validation/{kind}/{i}"), held_out=True) for i in range(n)]

    @staticmethod
    def _turns(kind: str, context: str, facts: list, rng: random.Random) -> dict:
        """The first question in "prompt", the others as follow-up turns."""
        turns = [(rng.choice(phrasings), answers[0]) for phrasings, answers in facts]
        return {"kind": kind, "context": context, "prompt": turns[0][0], "answer": turns[0][1],
                "follow_ups": turns[1:]}

    @staticmethod
    def _binding(world: World, split: Split, rng: random.Random) -> dict:
        """BINDING_PEOPLE people, one sentence each stating a fact of one kind (values drawn at
        random, all different), and 1-4 questions, each about a value (whose birth year?) or, with
        equal odds, by it (who was born in 1936?). Only a reader that holds which value is whose
        answers, in either direction: what the recall probe (evaluate.py --task recall) finds the
        tiny base doing at chance when two facts are of one kind."""
        kind = rng.choice(LADDER_FACTS)  # a field of Person
        n = rng.randint(*BINDING_PEOPLE)
        pools = {"birth_city": list(world.cities), "birth_year": RANDOM_YEARS, "job": JOBS,
                 "employer": [o.name for o in split.organisations]}
        values = rng.sample(pools[kind], n)
        people = [replace(p, **{kind: v}) for p, v in zip(rng.sample(split.people, n), values)]
        sentences, turns = [], []
        for person in people:
            slots = {**fact_slots(world, person), **subject_slots(person, by_name=True)}
            sentences.append(rng.choice(PERSON_SENTENCES[(kind,)]).format(**slots))
            phrasings, answers = facts_of(world, person)[kind]
            turns.append((rng.choice(phrasings), answers[0]) if rng.random() < 0.5
                         else (rng.choice(REVERSE_QUESTIONS[kind]).format(**slots), person.name))
        rng.shuffle(sentences)
        asked = rng.sample(turns, rng.randint(1, min(4, n)))
        return {"kind": "qa", "context": " ".join(sentences), "prompt": asked[0][0], "answer": asked[0][1],
                "follow_ups": asked[1:]}

    def _fewshot(self, world: World, split: Split, rng: random.Random) -> dict:
        """1-12 demonstrations `Input: x\\nOutput: y` of an invented task, then the query, as
        evaluate.py shows MetaICL. The loss on every demonstration's output (the text loss) asks
        for in-context learning all along the record."""
        pool = rng.choice(("people", "people", "organisations", "events"))
        entities = rng.sample(getattr(split, pool), rng.randint(2, 13))
        _, examples = self.invented_task(world, self._names(rng), rng, pool, entities)
        return {"kind": "fewshot", "context": fewshot_context(examples[:-1]),
                "prompt": fewshot_query(examples[-1][0]), "answer": examples[-1][1], "follow_ups": []}

    def lookup(self, shots: int, repeat: bool, key: str) -> dict:
        """An in-context look-up probe (evaluate.py --task lookup): `shots` demonstrations of a
        classification invented for the record, a key of the input (a job, a city, ...) mapped to
        arbitrary labels, whose keys take 2-4 values (1 for K = 1), each shown, then a query whose
        key is among the demonstrations' (repeat: whose input is one demonstration's, word for word).
        A reader that finds the query's key among the demonstrations answers every query.
        Returns {"demos": [(input, output), ...], "query", "answer", "labels"}."""
        return self._lookup(random.Random(f"fresh/lookup/{shots}/{repeat}/{key}"), shots, repeat)

    def _lookup(self, rng: random.Random, shots: int, repeat: bool) -> dict:
        world, split = self._fresh(rng, self.SIZES)
        pool = rng.choice(("people", "people", "organisations", "events"))
        field, (fact, value) = rng.choice([(k, v) for k, v in KEYS[pool].items() if v[0]])  # keys an input states
        entities = rng.sample(getattr(split, pool), shots + 1)
        values = list(dict.fromkeys(value(e) for e in entities))[:min(shots, rng.randint(2, 4))]
        keys = values + [rng.choice(values) for _ in range(shots - len(values))]  # every value shown
        rng.shuffle(keys)
        entities = [replace(e, **{field: v}) for e, v in zip(entities, keys + [rng.choice(values)])]
        names = self._names(rng)
        labels = []
        while len(labels) < len(values):
            label = label_word(names, rng, self.invented_labels, self.common_labels)
            labels += [label] if label not in labels else []
        mapping = dict(zip(values, labels))
        examples = [(input_sentence(world, e, [fact], rng), mapping[value(e)]) for e in entities]
        query, answer = rng.choice(examples[:-1]) if repeat else examples[-1]
        return {"demos": examples[:-1], "query": query, "answer": answer, "labels": labels}

    def invented_task(self, world: World, names: NameMaker, rng: random.Random, pool: str,
                      entities: list) -> tuple[Task, list[tuple[str, str]]]:
        """An invented task and its examples on `entities`; drawn again while it computes a
        MetaICL test task's outputs on them."""
        while True:
            task = invent_task(world, names, rng, pool, self.invented_labels, self.lower_labels,
                               self.common_labels, self.invented_phrasing)
            examples = [task.example(e) for e in entities]
            if not computes_a_test_task(examples, entities, self.test_tasks):
                return task, examples

    def _dialogue(self, world: World, rng: random.Random) -> dict:
        """One earlier session in which Speaker 1 states facts about themself (Speaker 2 states
        others, some on the same topics), then questions about Speaker 1's."""
        record, facts = msc_user(world, "fresh", rng)
        sessions = record["previous_dialogs"]
        said = [[f for f in facts if any(f.say in turn["text"] and turn["id"] == "Speaker 1" for turn in s["dialog"])]
                for s in sessions]
        s = rng.choice([i for i, stated in enumerate(said) if stated])
        context = dialogue_text({"previous_dialogs": [sessions[s]]})
        asked = rng.sample(said[s], rng.randint(1, len(said[s])))
        return self._turns("dialogue", context, [((f.question,), [f.answer]) for f in asked], rng)

