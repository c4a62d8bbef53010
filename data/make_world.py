"""Generate the embedded toy world: an invented world written in the layouts of real public datasets.

GenerativeAdapter is pretrained on web text (SlimPajama), instruction-tuned, and evaluated on
StreamingQA (the CaMeLS CSV), MetaICL and MemGPT's MSC-Self-Instruct. This script invents a small
world (countries, cities, people, organisations, events) and writes data in each of those layouts,
small enough to train and evaluate on a laptop CPU. Every person, organisation and event is
invented, so a question about one can only be answered from the context the model is given.

People, organisations and events are split train / validation / test, and everything said about an
entity is written only to files of its split (cities are shared by all splits, like real geography).
The output is a pure function of --seed: the same seed gives byte-identical files.

    python data/make_world.py [--seed N] [--out data]

Files written under {out}/world/ (see data/README.md for each real counterpart):
    entities.json                                    names per split, for leakage checks
    pretrain_{train,validation}.jsonl.gz             SlimPajama-style {"text", "meta"}
    streamingqa_{validation,test}.csv                CaMeLS StreamingQA: text, question, answers
    metaicl/{task}/{task}_16_{seed}_{train,test}.jsonl and metaicl/config/world_to_world.json
    msc_self_instruct_train.jsonl.gz, msc_self_instruct_test.jsonl   MemGPT's MSC-Self-Instruct
    instructions_train.jsonl.gz, instructions_validation.jsonl   {"context", "prompt", "answer"}
"""

import argparse
import csv
import gzip
import io
import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

SPLITS = ("train", "validation", "test")
STYLES = {"encyclopedia": "RedPajamaWikipedia", "news": "RedPajamaCommonCrawl"}  # style -> SlimPajama set


@dataclass
class WorldConfig:
    """Sizes of the world and of each file; the defaults are what the repository ships.

    Tuples of three are per split in SPLITS order (train, validation, test).
    """
    seed: int = 0
    countries: int = 8
    cities: int = 60
    first_names: int = 400
    people: tuple[int, int, int] = (2400, 300, 300)
    organisations: tuple[int, int, int] = (240, 30, 30)
    events: tuple[int, int, int] = (320, 40, 40)
    pretrain_train_bytes: int = 6_500_000  # raw text, before gzip
    pretrain_validation_records: int = 200
    streamingqa_documents: tuple[int, int] = (100, 300)  # validation, test
    metaicl_k: int = 16
    metaicl_seeds: tuple[int, ...] = (100, 13, 21, 42, 87)
    metaicl_test_examples: int = 40
    msc_users: tuple[int, int, int] = (500, 40, 100)  # the validation users only feed instructions
    instructions: tuple[int, int] = (20000, 300)  # train, validation


# -----------------------------------------------------------------------------
# Word lists and templates. Slots: {Subj}/{subj} subject at/after a sentence start, {Poss}/{poss}
# its possessive; the other slots are the facts of the entity (see *_slots below).

JOBS = ("baker", "carpenter", "nurse", "teacher", "electrician", "plumber", "accountant", "librarian",
        "pharmacist", "mechanic", "architect", "journalist", "chef", "dentist", "farmer", "tailor",
        "pilot", "lawyer", "engineer", "gardener", "photographer", "translator", "welder", "surveyor",
        "veterinarian", "cashier", "firefighter", "potter", "locksmith", "bus driver")
INDUSTRIES = ("textiles", "shipping", "banking", "publishing", "mining", "brewing", "software",
              "insurance", "furniture", "pharmaceuticals", "farming", "construction",
              "telecommunications", "retail", "energy", "food processing")
ORG_SUFFIXES = ("Group", "Works", "Holdings", "Partners", "Company", "Brothers", "Trust", "Collective",
                "Industries", "Associates")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# Invented names are (onset + vowel) syllables and a final coda: "Maro Velin", "Tesk".
ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "th", "sh")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
CODAS = ("", "", "", "n", "r", "l", "s", "k", "m", "sk")


@dataclass
class EventKind:
    """How one kind of event involves a person or an organisation, and how to ask about it."""
    role: str  # "person" or "organisation"
    role_phrase: str  # names the involved entity at a sentence start, e.g. "Its organiser"
    statements: tuple[str, ...]  # slot {x}: the involved entity
    questions: tuple[str, ...]  # slot {event}: the event's name


EVENT_KINDS = {
    "festival": EventKind("organisation", "Its organiser",
                          ("{Subj} was organised by {x}.", "{x} organised {subj}."),
                          ("Who organised the {event}?", "Which organisation ran the {event}?")),
    "trade fair": EventKind("organisation", "Its host",
                            ("{Subj} was hosted by {x}.", "{x} hosted {subj}."),
                            ("Who hosted the {event}?", "Which company hosted the {event}?")),
    "merger": EventKind("organisation", "The company behind it",
                        ("{Subj} saw {x} take over a smaller rival.",),
                        ("Which company took over a rival in the {event}?",)),
    "flood": EventKind("organisation", "The company that led the clean-up",
                       ("{x} led the clean-up after {subj}.",),
                       ("Which company led the clean-up after the {event}?",)),
    "fire": EventKind("organisation", "The owner of the warehouse",
                      ("{Subj} destroyed a warehouse owned by {x}.",),
                      ("Whose warehouse was destroyed in the {event}?",)),
    "strike": EventKind("organisation", "The employer of the strikers",
                        ("{Subj} was a strike by the workers of {x}.",),
                        ("Whose workers went on strike in the {event}?",)),
    "election": EventKind("person", "Its winner",
                          ("{Subj} was won by {x}.", "{x} won {subj}."),
                          ("Who won the {event}?", "Who was the winner of the {event}?")),
    "marathon": EventKind("person", "Its winner",
                          ("{Subj} was won by {x}.", "{x} won {subj}."),
                          ("Who won the {event}?", "Who was the winner of the {event}?")),
    "concert": EventKind("person", "Its headliner",
                         ("{Subj} was headlined by {x}.",),
                         ("Who headlined the {event}?",)),
    "expedition": EventKind("person", "Its leader",
                            ("{Subj} was led by {x}.", "{x} led {subj}."),
                            ("Who led the {event}?", "Who was the leader of the {event}?")),
}

# Fact sentences, keyed by the facts they state; a two-fact key merges two facts in one sentence.
PERSON_SENTENCES = {
    ("birth_city", "birth_year"): ("{Subj} was born in {city} in {year}.",
                                   "{Subj} was born in {year} in {city}, {country}."),
    ("birth_city",): ("{Subj} was born in {city}.", "{Subj} is a native of {city}.",
                      "{Poss} birthplace is {city}, a city in {country}."),
    ("birth_year",): ("{Subj} was born in {year}.", "{Subj} was born in the year {year}."),
    ("job", "employer"): ("{Subj} is {a_job} at {org}.", "{Subj} works as {a_job} for {org}."),
    ("job",): ("{Subj} works as {a_job}.", "{Subj} is {a_job} by trade.", "By profession, {subj} is {a_job}."),
    ("employer",): ("{Subj} works for {org}.", "{Subj} is employed by {org}.", "{Poss} employer is {org}."),
    ("spouse",): ("{Subj} is married to {other}.", "{Poss} {rel_word} is {other}."),
    ("sibling",): ("{Subj} has a {rel_word}, {other}.", "{other} is {poss} {rel_word}."),
}
ORG_SENTENCES = {
    ("industry", "hq"): ("{Subj} is {a_industry} company based in {city}.",
                         "{Subj} is {a_industry} firm headquartered in {city}."),
    ("industry",): ("{Subj} is a company in the {industry} industry.", "{Subj} operates in the {industry} sector."),
    ("hq",): ("{Subj} is headquartered in {city}.", "{Poss} head office is in {city}, {country}.",
              "{Subj} is based in {city}."),
    ("founded", "founder"): ("{Subj} was founded in {year} by {founder}.", "{founder} founded {subj} in {year}."),
    ("founded",): ("{Subj} was founded in {year}.", "{Subj} was established in {year}."),
    ("founder",): ("{Subj} was founded by {founder}.", "{Poss} founder is {founder}."),
}
EVENT_SENTENCES = {  # ("involved",) comes from the event's EventKind
    ("city", "year"): ("{Subj} took place in {city} in {year}.", "{Subj} was {a_kind} in {city} in {year}."),
    ("city",): ("{Subj} took place in {city}.", "{Subj} happened in {city}, {country}."),
    ("year",): ("{Subj} took place in {year}.", "{Subj} happened in {year}."),
}

PERSON_QUESTIONS = {
    "birth_city": ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
    "birth_year": ("When was {name} born?", "In what year was {name} born?", "What year was {name} born in?"),
    "job": ("What does {name} do for a living?", "What is {name}'s job?", "What is the occupation of {name}?"),
    "employer": ("Who does {name} work for?", "Which organisation employs {name}?",
                 "What company does {name} work for?"),
    "spouse": ("Who is {name} married to?", "Who is {name}'s {rel_word}?"),
    "sibling": ("Who is {name}'s {rel_word}?", "What is the name of {name}'s {rel_word}?"),
}
ORG_QUESTIONS = {
    "industry": ("What industry is {name} in?", "In which industry does {name} operate?"),
    "hq": ("Where is {name} based?", "In which city is {name} headquartered?", "Where is the head office of {name}?"),
    "founded": ("When was {name} founded?", "In what year was {name} established?"),
    "founder": ("Who founded {name}?", "Who was the founder of {name}?"),
}
EVENT_QUESTIONS = {  # "involved" comes from the event's EventKind
    "city": ("Where did the {event} take place?", "In which city did the {event} happen?"),
    "year": ("When did the {event} take place?", "In what year did the {event} happen?"),
}

# Distractors: other entities of the same split, described by their own facts ({x}, {desc}).
STAFF_DESCRIPTION = "{a_job} born in {city} in {year}"  # for an organisation's own staff
PERSON_DESCRIPTIONS = (STAFF_DESCRIPTION, "{a_job} at {org} who was born in {city}",
                       "{a_job} from {city}", "{a_job} born in {year} who works for {org}")
ORG_DESCRIPTIONS = ("{a_industry} company based in {city}", "{a_industry} firm founded in {year} by {founder}",
                    "a company founded in {year} and headquartered in {city}")
EVENT_DESCRIPTIONS = ("{a_kind} in {city} in {year}", "{a_kind} that took place in {city} in {year}")
PERSON_LINKS = ("{Subj} often works alongside {x}, {desc}.", "{Subj} is close friends with {x}, {desc}.",
                "{Subj} once shared a flat with {x}, {desc}.")
ORG_LINKS = ("A rival firm, {x}, is {desc}.", "{Subj} often competes with {x}, {desc}.")
EVENT_LINKS = ("{Subj} is often confused with {x}, {desc}.", "It is not to be confused with {x}, {desc}.")
RELATION_LINK = "{Poss} {rel_word}, {x}, is {desc}."
FOUNDER_LINK = "{Poss} founder, {x}, is {desc}."
STAFF_LINK = "Among {poss} staff is {x}, {desc}."
ROLE_LINK = "{role_phrase}, {x}, is {desc}."

# Sentences that state no fact: news openers and quotes, encyclopedia closers.
NEWS_OPENERS = {
    "person": ("{dateline} — {name} said on {day} that {claim}.",
               "{dateline} — Speaking to reporters on {day}, {name} said that {claim}."),
    "organisation": ("{dateline} — {name} announced on {day} that it would {plan}.",
                     "{dateline} — {name} said on {day} that it plans to {plan}."),
    "event": ("{dateline} — Residents gathered on {day} to remember the {name}.",
              "{dateline} — A new book about the {name} went on sale on {day}."),
}
NEWS_CLAIMS = ("the project was running ahead of schedule", "prices had risen sharply this year",
               "the team would move to a larger building", "more staff would be hired before winter",
               "the road works had caused long delays", "the new timetable was working well")
NEWS_PLANS = ("hire forty new workers", "open a second office", "raise its prices next year",
              "cut its working week to four days", "sell its oldest building", "invest in new machinery")
NEWS_QUOTES = ("We have a lot of work ahead of us", "It has been a remarkable year", "Nobody expected this",
               "I am proud of everyone involved", "We will keep going", "Things are finally improving")
NEWS_CLOSERS = {"person": "\"{quote},\" {subj} said.", "organisation": "\"{quote},\" a spokesperson said.",
                "event": "\"{quote},\" one resident said."}
ENCYCLOPEDIA_CLOSERS = {
    "person": ("Little has been published about {poss} early life.",
               "{Poss} career is described in several local histories."),
    "organisation": ("{Poss} early records are kept in the city archive.",
                     "{Subj} publishes a short annual report."),
    "event": ("{Subj} is still remembered by many residents.", "Accounts of {subj} appear in several local histories."),
}

# MSC-Self-Instruct: what a speaker says about themself, and how they later ask about it.
@dataclass
class PersonaTopic:
    """One kind of persona fact: ways to state it in a turn, the persona line, ways to ask for it."""
    says: tuple[str, ...]
    persona: str
    asks: tuple[str, ...]


PERSONA_TOPICS = {
    "pet": PersonaTopic(("I have a {kind} named {value}.", "My {kind} {value} chewed my shoes again this morning.",
                         "I just took my {kind}, {value}, to the vet."),
                        "I have a {kind} named {value}.",
                        ("What is the name of my {kind}?", "What did I say my {kind} is called?")),
    "hometown": PersonaTopic(("I grew up in {value}.", "I'm originally from {value}.",
                              "I was raised in {value}, so this weather is nothing new to me."),
                             "I grew up in {value}.",
                             ("Where did I grow up?", "Which city am I originally from?")),
    "job": PersonaTopic(("I work as {a_value}.", "I've been {a_value} for about ten years now.",
                         "Work was tiring today, being {a_value} is not easy."),
                        "I work as {a_value}.",
                        ("What do I do for a living?", "What is my job?")),
    "food": PersonaTopic(("My favourite food is {value}.", "I could eat {value} every single day.",
                          "I made {value} for dinner again, it's my favourite."),
                         "My favourite food is {value}.",
                         ("What is my favourite food?", "Which food did I say I love most?")),
    "sibling": PersonaTopic(("My {relation} {value} is coming to visit next week.",
                             "I talked to my {relation}, {value}, on the phone for hours."),
                            "I have a {relation} named {value}.",
                            ("What is my {relation}'s name?", "What is the name of my {relation}?")),
    "hobby": PersonaTopic(("I spend most weekends {value}.", "Lately I've really been into {value}."),
                          "I enjoy {value}.",
                          ("What do I like to do at weekends?", "What hobby did I tell you about?")),
    "team": PersonaTopic(("I never miss a match of the {value}.", "I'm a big supporter of the {value}."),
                         "I support the {value}.",
                         ("Which team do I support?", "What team am I a fan of?")),
}
PETS = ("dog", "cat", "parrot", "rabbit", "tortoise", "hamster")
FOODS = ("lasagna", "sushi", "pancakes", "curry", "tacos", "mushroom soup", "roast chicken", "dumplings",
         "apple pie", "fried rice", "falafel", "pizza", "noodles", "lentil stew", "fish pie", "omelettes")
HOBBIES = ("fishing", "painting", "rock climbing", "gardening", "knitting", "cycling", "birdwatching",
           "sailing", "baking bread", "playing chess", "hiking", "woodworking", "running", "pottery")
TEAM_SUFFIXES = ("Rovers", "United", "Wanderers", "Athletic", "Rangers")
SESSION_OPENERS = ("Hi again! How has your week been?", "Hey, good to talk to you again.",
                   "Hello! It's been a while.", "Hi! Did you have a nice weekend?", "Good evening! How are you?")
REACTIONS = ("Oh, that's nice!", "No way, really?", "That's lovely.", "Interesting!", "Ha, I can imagine.")
CHITCHAT = ("That sounds lovely.", "Ha, I know exactly what you mean.", "The weather has been so strange lately.",
            "I've been trying to get more sleep.", "Have you watched anything good recently?",
            "I finally finished that book I was reading.", "Work has been busy but manageable.",
            "I should really cook more often.", "Do you have any plans for the holidays?",
            "I went for a long walk yesterday.", "That's great to hear!", "Oh really? Tell me more.",
            "I'm thinking of redecorating my living room.", "My phone broke last week, so annoying.",
            "I tried a new cafe downtown.", "Same here, honestly.", "I hope things calm down soon.",
            "It's been a quiet week for me.", "We should talk more often.", "How is your family doing?")


# -----------------------------------------------------------------------------
# The world

@dataclass
class Person:
    first: str
    last: str
    pronoun: str  # "he" or "she"
    birth_city: str
    birth_year: int
    job: str
    employer: str  # an organisation of the same split
    relation: tuple[str, str] | None = None  # ("spouse" or "sibling", the other person's name)

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class Organisation:
    name: str  # "{word} {suffix}"; the word alone is also a gold answer
    industry: str
    hq: str
    founded: int = 0  # set once the split's people exist
    founder: str = ""


@dataclass
class Event:
    name: str  # "{word} {Kind}", written "the {name}"
    kind: str
    city: str
    year: int
    involved: str  # a person or organisation of the same split


@dataclass
class Split:
    """The entities of one split."""
    people: list[Person]
    organisations: list[Organisation]
    events: list[Event]


@dataclass
class World:
    """Everything invented; `people`, `organisations` (by name) and `staff` (per organisation) are derived."""
    cities: dict[str, str]  # city -> country
    splits: dict[str, Split]
    first_names: list[str]
    pet_names: list[str]
    teams: list[str]
    label_words: list[str]  # invented label words for MetaICL tasks

    def __post_init__(self):
        self.people = {p.name: p for s in self.splits.values() for p in s.people}
        self.organisations = {o.name: o for s in self.splits.values() for o in s.organisations}
        self.staff = {name: [] for name in self.organisations}
        for person in self.people.values():
            self.staff[person.employer].append(person)


def reserved_words() -> set[str]:
    """Every word in this file's word lists and templates: invented names must not be one of them."""
    constants = [value for key, value in globals().items() if key.isupper()]
    return {word.lower() for word in re.findall(r"[A-Za-z]+", repr(constants))}


class NameMaker:
    """Invents capitalised words from syllables and never returns the same word twice."""

    def __init__(self, rng: random.Random, taken: set[str] | None = None):
        """taken: the lower-case words it must not return (read, never changed); reserved_words()
        when not given."""
        self.rng = rng
        self.taken = reserved_words() if taken is None else taken
        self.used = set()

    def word(self) -> str:
        """A new word of 1-3 syllables (2 most often) and 4-8 letters."""
        while True:
            syllables = self.rng.choice((1, 2, 2, 2, 3))
            word = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(syllables))
            word = (word + self.rng.choice(CODAS)).capitalize()
            if 4 <= len(word) <= 8 and word.lower() not in self.taken and word.lower() not in self.used:
                self.used.add(word.lower())
                return word


def build_split(names: NameMaker, first_names: list[str], cities: list[str], sizes: tuple[int, int, int],
                rng: random.Random) -> Split:
    """Invent the people, organisations and events of one split, all related only to each other."""
    n_people, n_orgs, n_events = sizes
    orgs = [Organisation(f"{names.word()} {rng.choice(ORG_SUFFIXES)}", rng.choice(INDUSTRIES), rng.choice(cities))
            for _ in range(n_orgs)]
    people = [Person(rng.choice(first_names), names.word(), rng.choice(("he", "she")), rng.choice(cities),
                     rng.randint(1940, 2002), rng.choice(JOBS), rng.choice(orgs).name) for _ in range(n_people)]

    # A third of the people are married, a fifth have a sibling here (siblings share a surname).
    order = rng.sample(people, len(people))
    n_spouse, n_sibling = len(people) // 6, len(people) // 10
    pairs = [(order[2 * i], order[2 * i + 1], "spouse" if i < n_spouse else "sibling")
             for i in range(n_spouse + n_sibling)]
    for a, b, relation in pairs:
        if relation == "sibling":
            b.last = a.last
            while b.first == a.first:
                b.first = rng.choice(first_names)
    for a, b, relation in pairs:
        a.relation, b.relation = (relation, b.name), (relation, a.name)

    for org in orgs:
        founder = rng.choice([p for p in people if p.birth_year <= 1995])
        org.founder, org.founded = founder.name, rng.randint(founder.birth_year + 22, 2023)

    events = []
    for _ in range(n_events):
        kind = rng.choice(list(EVENT_KINDS))
        if EVENT_KINDS[kind].role == "person":
            person = rng.choice([p for p in people if p.birth_year <= 1998])
            involved, year = person.name, rng.randint(max(1950, person.birth_year + 20), 2024)
        else:
            org = rng.choice(orgs)
            involved, year = org.name, rng.randint(max(1950, org.founded), 2024)
        events.append(Event(f"{names.word()} {kind.title()}", kind, rng.choice(cities), year, involved))
    return Split(people, orgs, events)


def build_world(config: WorldConfig) -> World:
    """Invent the whole world from config.seed."""
    rng = random.Random(f"{config.seed}/world")
    names = NameMaker(rng)
    countries = [names.word() for _ in range(config.countries)]
    cities = {names.word(): countries[i % len(countries)] for i in range(config.cities)}
    first_names = [names.word() for _ in range(config.first_names)]
    splits = {split: build_split(names, first_names, list(cities),
                                 (config.people[i], config.organisations[i], config.events[i]), rng)
              for i, split in enumerate(SPLITS)}
    return World(cities, splits, first_names,
                 pet_names=[names.word() for _ in range(150)],
                 teams=[f"{names.word()} {rng.choice(TEAM_SUFFIXES)}" for _ in range(40)],
                 label_words=[names.word() for _ in range(5)])


def name_words(split: Split) -> list[str]:
    """The words that occur only in this split's names: surnames and the invented word of each org/event."""
    words = {p.last for p in split.people} | {n.name.split()[0] for n in split.organisations + split.events}
    return sorted(words)


# -----------------------------------------------------------------------------
# Documents

@dataclass
class Document:
    text: str
    questions: list[tuple[tuple[str, ...], list[str]]]  # per stated fact: (question phrasings, gold answers)


def article(noun: str) -> str:
    """'a baker', 'an engineer'."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def short_name(org_name: str) -> str:
    """'Ostrum Group' -> 'Ostrum'."""
    return org_name.split()[0]


def kind_of(entity) -> str:
    """'person', 'organisation' or 'event': the key of the per-kind opener and closer templates."""
    return {Person: "person", Organisation: "organisation", Event: "event"}[type(entity)]


def display(entity) -> str:
    """How an entity is written in running text ('the Kelmora Flood' for events)."""
    return f"the {entity.name}" if isinstance(entity, Event) else entity.name


def subject_slots(entity, by_name: bool) -> dict:
    """{Subj}, {subj}, {Poss}, {poss}: the entity's name, or a pronoun once it has been introduced."""
    if by_name:
        text = display(entity)
        subj, poss = text, f"{text}'s"
    elif isinstance(entity, Person):
        subj, poss = entity.pronoun, {"he": "his", "she": "her"}[entity.pronoun]
    else:
        subj, poss = "it", "its"
    return {"Subj": subj[0].upper() + subj[1:], "subj": subj, "Poss": poss[0].upper() + poss[1:], "poss": poss}


def fact_slots(world: World, entity) -> dict:
    """The template slots holding an entity's facts."""
    if isinstance(entity, Person):
        slots = {"name": entity.name, "city": entity.birth_city, "country": world.cities[entity.birth_city],
                 "year": entity.birth_year, "job": entity.job, "a_job": article(entity.job), "org": entity.employer}
        if entity.relation:
            other = world.people[entity.relation[1]]
            words = {"spouse": {"he": "husband", "she": "wife"}, "sibling": {"he": "brother", "she": "sister"}}
            slots |= {"other": other.name, "rel_word": words[entity.relation[0]][other.pronoun]}
        return slots
    if isinstance(entity, Organisation):
        return {"name": entity.name, "industry": entity.industry, "a_industry": article(entity.industry),
                "city": entity.hq, "country": world.cities[entity.hq], "year": entity.founded,
                "founder": entity.founder}
    return {"name": entity.name, "event": entity.name, "a_kind": article(entity.kind), "city": entity.city,
            "country": world.cities[entity.city], "year": entity.year, "x": display(involved(world, entity))}


def involved(world: World, event: Event):
    """The person or organisation an event involves."""
    return world.people.get(event.involved) or world.organisations[event.involved]


def facts_of(world: World, entity) -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """Every fact of an entity: relation -> (question phrasings, gold answers)."""
    slots = fact_slots(world, entity)

    def fact(phrasings: tuple[str, ...], answers: list[str]) -> tuple[tuple[str, ...], list[str]]:
        return tuple(p.format(**slots) for p in phrasings), answers

    def answers_for(name: str) -> list[str]:
        """Gold answers naming a person, or an organisation (with and without its suffix)."""
        return [name, short_name(name)] if name in world.organisations else [name]

    if isinstance(entity, Person):
        facts = {"birth_city": fact(PERSON_QUESTIONS["birth_city"], [entity.birth_city]),
                 "birth_year": fact(PERSON_QUESTIONS["birth_year"], [str(entity.birth_year)]),
                 "job": fact(PERSON_QUESTIONS["job"], [entity.job]),
                 "employer": fact(PERSON_QUESTIONS["employer"], answers_for(entity.employer))}
        if entity.relation:
            kind, other = entity.relation
            facts[kind] = fact(PERSON_QUESTIONS[kind], [other])
        return facts
    if isinstance(entity, Organisation):
        return {"industry": fact(ORG_QUESTIONS["industry"], [entity.industry]),
                "hq": fact(ORG_QUESTIONS["hq"], [entity.hq]),
                "founded": fact(ORG_QUESTIONS["founded"], [str(entity.founded)]),
                "founder": fact(ORG_QUESTIONS["founder"], [entity.founder])}
    return {"city": fact(EVENT_QUESTIONS["city"], [entity.city]),
            "year": fact(EVENT_QUESTIONS["year"], [str(entity.year)]),
            "involved": fact(EVENT_KINDS[entity.kind].questions, answers_for(entity.involved))}


def mention(world: World, template: str, other, rng: random.Random, descriptions: tuple[str, ...] = ()) -> str:
    """Fill a link template with another entity and a description of its own facts
    ('a nurse born in Rell in 1971'); the main entity's slots are left for later."""
    descriptions = descriptions or {Person: PERSON_DESCRIPTIONS, Organisation: ORG_DESCRIPTIONS,
                                    Event: EVENT_DESCRIPTIONS}[type(other)]
    description = rng.choice(descriptions).format(**fact_slots(world, other))
    return template.replace("{x}", display(other)).replace("{desc}", description)


def related_mention(world: World, entity, rng: random.Random) -> tuple[str, str | None] | None:
    """Sometimes a sentence about an entity related to the main one (spouse or sibling, founder or
    staff, who an event involved), with the main entity's fact that it states (None for staff)."""
    roll = rng.random()
    if isinstance(entity, Person) and entity.relation and roll < 0.5:
        return mention(world, RELATION_LINK, world.people[entity.relation[1]], rng), entity.relation[0]
    if isinstance(entity, Organisation) and roll < 0.35:
        return mention(world, FOUNDER_LINK, world.people[entity.founder], rng), "founder"
    if isinstance(entity, Organisation) and roll < 0.6 and world.staff[entity.name]:
        return mention(world, STAFF_LINK, rng.choice(world.staff[entity.name]), rng, (STAFF_DESCRIPTION,)), None
    if isinstance(entity, Event) and roll < 0.4:
        role_link = ROLE_LINK.replace("{role_phrase}", EVENT_KINDS[entity.kind].role_phrase)
        return mention(world, role_link, involved(world, entity), rng), "involved"
    return None


def other_mention(world: World, split: Split, entity, rng: random.Random) -> str:
    """A sentence about another entity of the same kind and split (a friend, a rival...)."""
    pool, links = {Person: (split.people, PERSON_LINKS), Organisation: (split.organisations, ORG_LINKS),
                   Event: (split.events, EVENT_LINKS)}[type(entity)]
    other = rng.choice(pool)
    while other.name == entity.name:
        other = rng.choice(pool)
    return mention(world, rng.choice(links), other, rng)


def fact_templates(entity, relations: list[str], rng: random.Random) -> list[str]:
    """One sentence template per fact, in a fixed order, merging two facts where a merged phrasing exists."""
    if isinstance(entity, Person):
        sentences = PERSON_SENTENCES
    elif isinstance(entity, Organisation):
        sentences = ORG_SENTENCES
    else:
        sentences = EVENT_SENTENCES | {("involved",): EVENT_KINDS[entity.kind].statements}
    order = [key[0] for key in sentences if len(key) == 1]
    left = [r for r in order if r in relations]
    templates = []
    while left:
        first = left.pop(0)
        if left and (first, left[0]) in sentences and rng.random() < 0.5:
            key = (first, left.pop(0))
        else:
            key = (first,)
        templates.append(rng.choice(sentences[key]))
    return templates


def write_document(world: World, split: Split, entity, style: str, rng: random.Random,
                   distractors: bool = True, states: str | None = None) -> Document:
    """One document (~30-90 words) stating 2-4 facts of an entity, with 1-2 distractor entities
    (or, with distractors=False, about that entity alone); `states` names a fact it must state."""
    facts = facts_of(world, entity)
    stated = rng.sample(list(facts), rng.randint(2, min(4, len(facts))))
    if states and states not in stated:
        stated[0] = states
    related = related_mention(world, entity, rng) if distractors else None
    links, link_fact = ([related[0]], related[1]) if related else ([], None)
    if distractors and (not links or rng.random() < 0.5):
        links.append(other_mention(world, split, entity, rng))
    templates = fact_templates(entity, [r for r in stated if r != link_fact], rng)
    if link_fact and link_fact not in stated:
        stated.append(link_fact)

    kind, slots = kind_of(entity), fact_slots(world, entity)
    pronoun = subject_slots(entity, by_name=False)
    if style == "encyclopedia":  # the first fact introduces the entity by name
        sentences = [templates[0].format(**slots, **subject_slots(entity, by_name=True))]
        sentences += [t.format(**slots, **pronoun) for t in templates[1:] + links]
        sentences.append(rng.choice(ENCYCLOPEDIA_CLOSERS[kind]).format(**pronoun))
    else:  # a dateline opener introduces the entity by name
        sentences = [rng.choice(NEWS_OPENERS[kind]).format(
            dateline=rng.choice(list(world.cities)).upper(), name=entity.name, day=rng.choice(WEEKDAYS),
            claim=rng.choice(NEWS_CLAIMS), plan=rng.choice(NEWS_PLANS))]
        sentences += [t.format(**slots, **pronoun) for t in templates + links]
        sentences.append(NEWS_CLOSERS[kind].format(quote=rng.choice(NEWS_QUOTES), **pronoun))
    return Document(" ".join(sentences), [facts[r] for r in stated])


def pick_entity(split: Split, rng: random.Random):
    """A random entity of the split: mostly people, some organisations and events."""
    roll = rng.random()
    pool = split.people if roll < 0.65 else split.organisations if roll < 0.82 else split.events
    return rng.choice(pool)


# -----------------------------------------------------------------------------
# Pretraining text (SlimPajama) and StreamingQA (CaMeLS CSV)

def pretrain_record(world: World, split: Split, rng: random.Random) -> dict:
    """A SlimPajama-style record: 300-1500 words of same-style documents joined by blank lines."""
    style = rng.choice(list(STYLES))
    target_words, words, documents = rng.randint(300, 1500), 0, []
    while words < target_words:
        text = write_document(world, split, pick_entity(split, rng), style, rng).text
        documents.append(text)
        words += len(text.split())
    return {"text": "\n\n".join(documents), "meta": {"redpajama_set_name": STYLES[style]}}


def pretrain_records(world: World, split_name: str, config: WorldConfig) -> list[dict]:
    """Train: records until config.pretrain_train_bytes of text; validation: a fixed number of records."""
    rng = random.Random(f"{config.seed}/pretrain/{split_name}")
    split = world.splits[split_name]
    if split_name == "validation":
        return [pretrain_record(world, split, rng) for _ in range(config.pretrain_validation_records)]
    records, size = [], 0
    while size < config.pretrain_train_bytes:
        records.append(pretrain_record(world, split, rng))
        size += len(records[-1]["text"].encode("utf-8"))
    return records


def streamingqa_csv(world: World, split_name: str, n_documents: int, seed: int) -> str:
    """CaMeLS StreamingQA CSV: one row per question, the document repeated, answers joined by '\\'."""
    rng = random.Random(f"{seed}/streamingqa/{split_name}")
    split = world.splits[split_name]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("text", "question", "answers"))
    for entity in rng.sample(split.people + split.organisations + split.events, n_documents):
        document = write_document(world, split, entity, rng.choice(list(STYLES)), rng)
        for phrasings, answers in rng.sample(document.questions, rng.randint(1, min(3, len(document.questions)))):
            writer.writerow((document.text, rng.choice(phrasings), "\\".join(answers)))
    return buffer.getvalue()


# -----------------------------------------------------------------------------
# MetaICL tasks

@dataclass
class Task:
    """A MetaICL-style task: a fixed rule turning one entity into an (input, output) example."""
    name: str
    pool: str  # which entities inputs are about: "people", "organisations" or "events"
    options: list[str]  # the labels of a classification task, [] for free-form output
    example: Callable[[object], tuple[str, str]]


def build_tasks(world: World, seed: int) -> tuple[list[Task], list[Task]]:
    """The train and test tasks; half classify with an arbitrary per-world rule, half reformat a fact."""
    rng = random.Random(f"{seed}/metaicl-rules")

    def assign(keys, labels: list[str]) -> dict:
        """A fixed but arbitrary mapping of keys to labels that uses every label."""
        keys = rng.sample(list(keys), len(keys))
        return {key: labels[i % len(labels)] for i, key in enumerate(keys)}

    guilds = [f"{word} Guild" for word in world.label_words[:3]]
    guild, region = assign(JOBS, guilds), assign(world.cities, ["north", "south", "east", "west"])
    sector, mood = assign(INDUSTRIES, ["primary", "secondary", "tertiary"]), assign(EVENT_KINDS, ["calm", "stormy"])
    era_cut, founded_cut = rng.randint(1955, 1985), rng.randint(1975, 2005)
    old, new = rng.sample(["old guard", "new wave"], 2)
    early, late = rng.sample(["yes", "no"], 2)
    train = [
        Task("job_to_guild", "people", guilds, lambda p: (f"{p.name} works as {article(p.job)}.", guild[p.job])),
        Task("city_to_region", "people", ["north", "south", "east", "west"],
             lambda p: (f"{p.name} was born in {p.birth_city}.", region[p.birth_city])),
        Task("birth_year_to_era", "people", ["old guard", "new wave"],
             lambda p: (f"{p.name} was born in {p.birth_year}.", old if p.birth_year < era_cut else new)),
        Task("industry_to_sector", "organisations", ["primary", "secondary", "tertiary"],
             lambda o: (f"{o.name} is {article(o.industry)} company.", sector[o.industry])),
        Task("event_kind_to_mood", "events", ["calm", "stormy"],
             lambda e: (f"The {e.name} took place in {e.city}.", mood[e.kind])),
        Task("founded_early", "organisations", ["yes", "no"],
             lambda o: (f"{o.name} was founded in {o.founded}.", early if o.founded < founded_cut else late)),
        Task("person_to_birthplace_code", "people", [],
             lambda p: (f"{p.name} was born in {p.birth_city}.", p.birth_city.upper())),
        Task("org_founder", "organisations", [],
             lambda o: (f"{o.name} was founded by {o.founder} in {o.founded}.", f"Founder: {o.founder}")),
        Task("person_initials", "people", [],
             lambda p: (f"{p.name} is {article(p.job)} from {p.birth_city}.", f"{p.first[0]}.{p.last[0]}.")),
        Task("event_short_year", "events", [],
             lambda e: (f"The {e.name} took place in {e.city} in {e.year}.", f"'{e.year % 100:02d}")),
        Task("employer_lower", "people", [],
             lambda p: (f"{p.name} works for {p.employer}.", short_name(p.employer).lower())),
        Task("job_title", "people", [],
             lambda p: (f"{p.name} works as {article(p.job)} at {p.employer}.", f"{p.job.title()} {p.last}")),
    ]
    shift, climate = assign(JOBS, ["day", "night", "rotating"]), assign(world.cities, ["rainy", "sunny", "windy"])
    even, odd = world.label_words[3:5]
    test = [
        Task("job_to_shift", "people", ["day", "night", "rotating"],
             lambda p: (f"{p.name} is employed as {article(p.job)}.", shift[p.job])),
        Task("city_to_climate", "people", ["rainy", "sunny", "windy"],
             lambda p: (f"{p.name} comes from {p.birth_city}.", climate[p.birth_city])),
        Task("birth_year_parity", "people", [even, odd],
             lambda p: (f"{p.name} was born in {p.birth_year}.", odd if p.birth_year % 2 else even)),
        Task("name_swap", "people", [], lambda p: (f"{p.name} works as {article(p.job)}.", f"{p.last}, {p.first}")),
        Task("birthplace_tag", "people", [],
             lambda p: (f"{p.name} was born in {p.birth_city} in {p.birth_year}.", f"{p.birth_city} ({p.birth_year})")),
        Task("employer_tag", "people", [],
             lambda p: (f"{p.name} is on the staff of {p.employer}.", f"Employer = {p.employer}")),
    ]
    return train, test


def metaicl_records(task: Task, entities: list) -> list[dict]:
    """MetaICL records {"task", "input", "output", "options"} for the given entities."""
    return [{"task": task.name, "input": x, "output": y, "options": task.options}
            for x, y in map(task.example, entities)]


def metaicl_files(world: World, config: WorldConfig) -> dict[str, bytes]:
    """Per task and seed: k training demonstrations and the (seed-independent) test examples."""
    train_tasks, test_tasks = build_tasks(world, config.seed)
    files = {}
    for task, split in [(t, "train") for t in train_tasks] + [(t, "test") for t in test_tasks]:
        pool = getattr(world.splits[split], task.pool)
        rng = random.Random(f"{config.seed}/metaicl/{task.name}")
        test_entities = rng.sample(pool, config.metaicl_test_examples)
        test_names = {e.name for e in test_entities}
        rest = [e for e in pool if e.name not in test_names]
        test_lines = jsonl(metaicl_records(task, test_entities))
        for seed in config.metaicl_seeds:
            demos = random.Random(f"{config.seed}/metaicl/{task.name}/{seed}").sample(rest, config.metaicl_k)
            stem = f"metaicl/{task.name}/{task.name}_{config.metaicl_k}_{seed}"
            files[f"{stem}_train.jsonl"] = jsonl(metaicl_records(task, demos))
            files[f"{stem}_test.jsonl"] = test_lines
    task_config = {"train": [t.name for t in train_tasks], "test": [t.name for t in test_tasks]}
    files["metaicl/config/world_to_world.json"] = (json.dumps(task_config, indent=2) + "\n").encode("utf-8")
    return files


# -----------------------------------------------------------------------------
# MSC-Self-Instruct

@dataclass
class PersonaFact:
    """A fact a speaker states about themself, and how they later ask about it."""
    topic: str
    say: str  # the sentence that states it in a dialogue turn
    persona: str
    question: str  # asked later by the same speaker
    answer: str


def persona_fact(world: World, topic: str, rng: random.Random) -> PersonaFact:
    """A random persona fact on a topic."""
    if topic == "pet":
        slots = {"kind": rng.choice(PETS), "value": rng.choice(world.pet_names)}
    elif topic == "hometown":
        slots = {"value": rng.choice(list(world.cities))}
    elif topic == "job":
        job = rng.choice(JOBS)
        slots = {"value": job, "a_value": article(job)}
    elif topic == "food":
        slots = {"value": rng.choice(FOODS)}
    elif topic == "sibling":
        slots = {"relation": rng.choice(("brother", "sister")), "value": rng.choice(world.first_names)}
    elif topic == "hobby":
        slots = {"value": rng.choice(HOBBIES)}
    else:
        slots = {"value": rng.choice(world.teams)}
    spec = PERSONA_TOPICS[topic]
    return PersonaFact(topic, rng.choice(spec.says).format(**slots), spec.persona.format(**slots),
                       rng.choice(spec.asks).format(**slots), slots["value"])


def session_turns(speakers: list[int], placed: dict[tuple[int, int], PersonaFact], session: int,
                  rng: random.Random) -> list[dict]:
    """The turns of one session (speakers: 1 or 2 per turn); the turn placed at (session, turn) states
    that fact, every other turn is chit-chat."""
    turns = []
    for t, speaker in enumerate(speakers):
        if t == 0:
            parts = [rng.choice(SESSION_OPENERS)]
        elif rng.random() < 0.4:
            parts = [rng.choice(REACTIONS)]
        else:
            parts = []
        fact = placed.get((session, t))
        parts.append(fact.say if fact else rng.choice(CHITCHAT))
        turns.append({"id": f"Speaker {speaker}", "text": " ".join(parts)})
    return turns


def msc_user(world: World, user_id: str, rng: random.Random) -> tuple[dict, list[PersonaFact]]:
    """One MSC-Self-Instruct record (3-4 earlier sessions) and all of Speaker 1's persona facts.

    Each fact is stated once, by its speaker, in an earlier session; Speaker 2's facts are distractors
    (possibly on the same topic as a Speaker 1 fact, never with the same answer).
    """
    own = [persona_fact(world, t, rng) for t in rng.sample(list(PERSONA_TOPICS), rng.randint(4, 5))]
    answers = {f.topic: f.answer for f in own}
    other = []
    for topic in rng.sample(list(PERSONA_TOPICS), rng.randint(3, 4)):
        fact = persona_fact(world, topic, rng)
        while fact.answer == answers.get(topic):
            fact = persona_fact(world, topic, rng)
        other.append(fact)

    layout = []
    for _ in range(rng.randint(3, 4)):
        start = rng.choice((1, 2))
        layout.append([1 + (start - 1 + t) % 2 for t in range(rng.randint(6, 10))])
    placed = {}
    for speaker, facts in ((1, own), (2, other)):
        slots = [(s, t) for s, speakers in enumerate(layout) for t, who in enumerate(speakers) if who == speaker]
        placed |= dict(zip(rng.sample(slots, len(facts)), facts))
    sessions = [{"dialog": session_turns(speakers, placed, s, rng)} for s, speakers in enumerate(layout)]
    current = session_turns([1 + t % 2 for t in range(rng.randint(2, 4))], {}, len(layout), rng)
    asked = rng.choice(own)
    record = {"previous_dialogs": sessions, "dialog": current,
              "personas": [[f.persona for f in own], [f.persona for f in other]],
              "metadata": {"initial_data_id": user_id, "session_id": len(sessions) + 1},
              "self_instruct": {"B": asked.question, "A": asked.answer}}
    return record, own


def msc_users(world: World, split: str, n_users: int, seed: int) -> list[tuple[dict, list[PersonaFact]]]:
    """The MSC users of a split (their persona facts are invented per user, not world entities)."""
    rng = random.Random(f"{seed}/msc/{split}")
    return [msc_user(world, f"world-{split}-{i:04d}", rng) for i in range(n_users)]


def dialogue_text(record: dict) -> str:
    """The earlier sessions as 'Speaker 1: ...' lines, sessions separated by a blank line."""
    return "\n\n".join("\n".join(f"{turn['id']}: {turn['text']}" for turn in session["dialog"])
                       for session in record["previous_dialogs"])


# -----------------------------------------------------------------------------
# Instruction tuning

def documents_about(world: World, split: Split, n: int, rng: random.Random, distractors: bool = True) -> list[Document]:
    """Documents about n entities drawn from the split (fewer when a draw repeats), each in a random style."""
    entities = {}
    for _ in range(n):
        entity = pick_entity(split, rng)
        entities[entity.name] = entity
    return [write_document(world, split, e, rng.choice(list(STYLES)), rng, distractors) for e in entities.values()]


def qa_instruction(world: World, split: Split, rng: random.Random) -> dict:
    """A question about one of 1-3 documents given as context."""
    documents = documents_about(world, split, rng.randint(1, 3), rng)
    phrasings, answers = rng.choice(rng.choice(documents).questions)
    return {"context": "\n\n".join(d.text for d in documents), "prompt": rng.choice(phrasings), "answer": answers[0]}


def fewshot_context(demos: list[tuple[str, str]]) -> str:
    """(input, output) demonstrations as MetaICL prompts show them: `Input: x\nOutput: y`, a blank
    line between two."""
    return "\n\n".join(f"Input: {x}\nOutput: {y}" for x, y in demos)


def fewshot_query(x: str) -> str:
    """A few-shot query, its output to follow: `Input: x\nOutput:`."""
    return f"Input: {x}\nOutput:"


def fewshot_instruction(task: Task, split: Split, rng: random.Random) -> dict:
    """A MetaICL train task shown as 4-16 demonstrations followed by a query."""
    entities = rng.sample(getattr(split, task.pool), rng.randint(4, 16) + 1)
    examples = [task.example(e) for e in entities]
    return {"context": fewshot_context(examples[:-1]), "prompt": fewshot_query(examples[-1][0]),
            "answer": examples[-1][1]}


def instruction_records(world: World, split_name: str, n: int, users: list, seed: int) -> list[dict]:
    """A shuffled mix: at most a tenth dialogue memory (one per user fact), the rest 60% QA, 40% few-shot."""
    rng = random.Random(f"{seed}/instructions/{split_name}")
    split = world.splits[split_name]
    train_tasks, _ = build_tasks(world, seed)
    memory = [{"context": dialogue_text(record), "prompt": fact.question, "answer": fact.answer}
              for record, facts in users for fact in facts]
    records = rng.sample(memory, min(len(memory), n // 10))
    n_qa = round(0.6 * (n - len(records)))
    records += [qa_instruction(world, split, rng) for _ in range(n_qa)]
    records += [fewshot_instruction(rng.choice(train_tasks), split, rng) for _ in range(n - len(records))]
    rng.shuffle(records)
    return records


# -----------------------------------------------------------------------------
# The ladder: instruction records of rising difficulty, for the generator's instruction tuning

LADDER_FACTS = ("birth_city", "birth_year", "job", "employer")  # what rungs "fact" and "people" state
RANDOM_YEARS = range(1920, 2006)  # the birth years the ladder draws at random


class Ladder:
    """Endless (context, prompt, answer) records about the committed world's people, in rungs of
    rising difficulty (train.py's --curriculum climbs them in order):

      fact       one fact of one person in one sentence ("Maro Velin was born in Tesk.");
      people     1-4 people with 1-3 facts each, one sentence per fact, shuffled;
      documents  1-3 documents with distractors, as in instructions_train (qa_instruction);
      streams    3-8 documents (about 150-600 tokens, several windows), a question on any one;
      fewshot    4-16 demonstrations of a MetaICL train task, then a query (fewshot_instruction);
      tasks      1-12 demonstrations of a task invented for the record about invented entities, then
                 a query (data/fresh_worlds.py, as the tiny base learns in-context learning): a
                 task of its own in every record, so only the context tells what to answer;
      dialogue   an MSC user's earlier sessions, then a question about one of their own facts;
      alike      2-4 documents about people, every one stating the fact asked about (a birthplace
                 beside birthplaces): telling apart values of one kind by whose they are;
      pairs      two people, one sentence each, both stating the fact asked about ("Maro Velin was
                 born in Tesk. Dari Olt was born in Vesk."): that telling apart and nothing else.

    In "fact", "people", "alike" and "pairs" the values are drawn at random for each record (a person's
    birthplace differs between records), so the answer can only come from the context. Names come
    from the split asked for: train records name train entities (and train tasks and MSC users) only,
    validation records validation ones. A share `replay` of each rung's records are drawn from the
    rungs below it and the rungs `climbed` before it (a curriculum's earlier phases), so that they
    are not forgotten. Record i of a rung is a function of (rung, split, key, climbed).
    """

    RUNGS = ("fact", "people", "documents", "streams", "fewshot", "tasks", "dialogue", "alike", "pairs")
    REPLAY = 0.25  # the default share of replayed records (train.py's --replay)

    def __init__(self, config: WorldConfig = WorldConfig(), replay: float = REPLAY):
        self.world, self.replay, self.config = build_world(config), replay, config
        self.tasks = build_tasks(self.world, config.seed)[0]
        self.users = {}  # split -> its MSC users (those of the msc_self_instruct files), made when first asked
        self.fresh = None  # the invented worlds of rung "tasks", made when first asked

    def record(self, rung: str, split_name: str, key: str, climbed: tuple[str, ...] = ()) -> dict:
        if rung not in self.RUNGS:
            raise ValueError(f"ladder rung '{rung}': expected one of {list(self.RUNGS)}")
        rng = random.Random(f"ladder/{rung}/{split_name}/{key}")
        below = self.RUNGS[:self.RUNGS.index(rung)]
        replayed = below + tuple(r for r in self.RUNGS if r in climbed and r not in below and r != rung)
        if replayed and rng.random() < self.replay:
            rung = rng.choice(replayed)
        split = self.world.splits[split_name]
        if rung in ("fact", "people"):
            return self._facts(split, rng, people=1 if rung == "fact" else rng.randint(1, 4),
                               facts=1 if rung == "fact" else None)[0]
        if rung == "pairs":
            return self._facts(split, rng, people=2, facts=1, kind=rng.choice(LADDER_FACTS))[0]
        if rung == "fewshot":
            return fewshot_instruction(rng.choice(self.tasks), split, rng)
        if rung == "tasks":
            from data.fresh_worlds import FreshWorlds  # it builds on this module
            self.fresh = self.fresh or FreshWorlds(self.config)
            record = self.fresh.record("fewshot", rng)
            return {field: record[field] for field in ("context", "prompt", "answer")}
        if rung == "dialogue":
            if split_name not in self.users:
                n_users = self.config.msc_users[SPLITS.index(split_name)]
                self.users[split_name] = msc_users(self.world, split_name, n_users, self.config.seed)
            user, facts = rng.choice(self.users[split_name])
            fact = rng.choice(facts)
            return {"context": dialogue_text(user), "prompt": fact.question, "answer": fact.answer}
        if rung == "alike":
            return self._alike(split, rng)
        documents = documents_about(self.world, split, rng.randint(1, 3) if rung == "documents"
                                    else rng.randint(3, 8), rng)
        phrasings, answers = rng.choice(rng.choice(documents).questions)
        return {"context": "\n\n".join(d.text for d in documents), "prompt": rng.choice(phrasings),
                "answer": answers[0]}

    def recall(self, split_name: str, n: int, key: str) -> dict:
        """An associative-recall probe: n facts, each of another person, one sentence each, and a
        question about one of them (how many facts can one context's adapter hold?); "alike":
        how many of the other facts are of the asked kind (another birthplace for a birthplace)."""
        rng = random.Random(f"ladder/recall/{split_name}/{n}/{key}")
        record, alike = self._facts(self.world.splits[split_name], rng, people=n, facts=1)
        return {**record, "alike": alike}

    def _alike(self, split: Split, rng: random.Random) -> dict:
        """Documents about 2-4 people with random facts, each stating the kind of fact asked about
        one of them."""
        asked = rng.choice(LADDER_FACTS)
        people = [self._random_facts(person, split, rng) for person in rng.sample(split.people, rng.randint(2, 4))]
        documents = [write_document(self.world, split, p, rng.choice(list(STYLES)), rng, states=asked)
                     for p in people]
        phrasings, answers = facts_of(self.world, rng.choice(people))[asked]
        return {"context": "\n\n".join(d.text for d in documents), "prompt": rng.choice(phrasings),
                "answer": answers[0]}

    def _random_facts(self, person: Person, split: Split, rng: random.Random) -> Person:
        """The person with LADDER_FACTS drawn at random: values only a context can hold."""
        return replace(person, birth_city=rng.choice(list(self.world.cities)), birth_year=rng.choice(RANDOM_YEARS),
                       job=rng.choice(JOBS), employer=rng.choice(split.organisations).name)

    def _facts(self, split: Split, rng: random.Random, people: int, facts: int | None,
               kind: str | None = None) -> tuple[dict, int]:
        """Sentences stating random facts of `people` people (`facts` each, or 1-3; with `kind`,
        that one fact each), and a question about one of them; and how many of the other people's
        facts are of its kind."""
        sentences, questions, kinds = [], [], []
        for person in rng.sample(split.people, people):
            person = self._random_facts(person, split, rng)
            slots = {**fact_slots(self.world, person), **subject_slots(person, by_name=True)}
            stated = [kind] if kind else rng.sample(LADDER_FACTS, facts or rng.randint(1, 3))
            sentences += [rng.choice(PERSON_SENTENCES[(r,)]).format(**slots) for r in stated]
            questions += [facts_of(self.world, person)[r] for r in stated]
            kinds += [(person.name, r) for r in stated]
        rng.shuffle(sentences)
        (phrasings, answers), (whose, kind) = rng.choice(list(zip(questions, kinds)))
        alike = sum(k == kind and name != whose for name, k in kinds)
        return {"context": " ".join(sentences), "prompt": rng.choice(phrasings), "answer": answers[0]}, alike


# -----------------------------------------------------------------------------
# Writing

def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def gzipped(data: bytes) -> bytes:
    """gzip with a fixed header (mtime 0, no file name) so that equal input gives equal bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as f:
        f.write(data)
    return buffer.getvalue()


def generate(config: WorldConfig) -> dict[str, bytes]:
    """Every file of the world, as {path relative to the world folder: bytes}."""
    world = build_world(config)
    users = {split: msc_users(world, split, config.msc_users[i], config.seed) for i, split in enumerate(SPLITS)}
    entities = {"cities": world.cities,
                "splits": {name: {"people": [p.name for p in split.people],
                                  "organisations": [o.name for o in split.organisations],
                                  "events": [e.name for e in split.events],
                                  "name_words": name_words(split)} for name, split in world.splits.items()}}
    files = {"entities.json": (json.dumps(entities, indent=1) + "\n").encode("utf-8")}
    for split in ("train", "validation"):
        files[f"pretrain_{split}.jsonl.gz"] = gzipped(jsonl(pretrain_records(world, split, config)))
    for split, n_documents in zip(("validation", "test"), config.streamingqa_documents):
        files[f"streamingqa_{split}.csv"] = streamingqa_csv(world, split, n_documents, config.seed).encode("utf-8")
    files |= metaicl_files(world, config)
    files["msc_self_instruct_train.jsonl.gz"] = gzipped(jsonl([record for record, _ in users["train"]]))
    files["msc_self_instruct_test.jsonl"] = jsonl([record for record, _ in users["test"]])
    n_train, n_validation = config.instructions
    files["instructions_train.jsonl.gz"] = gzipped(jsonl(
        instruction_records(world, "train", n_train, users["train"], config.seed)))
    files["instructions_validation.jsonl"] = jsonl(
        instruction_records(world, "validation", n_validation, users["validation"], config.seed))
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the fictional world's datasets under OUT/world/.")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed gives byte-identical files (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("data"),
                        help="folder to write world/ into (default: data)")
    args = parser.parse_args(argv)
    files = generate(WorldConfig(seed=args.seed))
    root = args.out / "world"
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)

    metaicl = [path for path in files if path.startswith("metaicl/")]
    sizes = {path: len(data) for path, data in files.items() if path not in metaicl}
    sizes[f"metaicl/ ({len(metaicl)} files)"] = sum(len(files[path]) for path in metaicl)
    for path, size in sizes.items():
        print(f"{size / 1024:9.1f} KiB  {root / path}")
    print(f"{sum(sizes.values()) / 1024 ** 2:9.2f} MiB  in all")


if __name__ == "__main__":
    main()
