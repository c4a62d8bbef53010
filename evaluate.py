"""Evaluates GenerativeAdapter against the paper's baselines on StreamingQA, MetaICL and MSC,
on an associative-recall probe (how many one-sentence facts a context can carry) and on an
in-context look-up probe (whether demonstrations are read at all).

    python evaluate.py --task streamingqa            # bundled world + tiny base + tiny generator
    python evaluate.py --task recall --facts 1 4 16 64 --methods prompt,adapter
    python evaluate.py --task metaicl --methods closed_book,prompt,adapter
    python evaluate.py --task lookup --query repeat --methods prompt
    python evaluate.py --task msc --base /models/Mistral-7B-Instruct-v0.2 \\
        --generator runs/mistral-sft/checkpoint --data /data/msc_self_instruct.jsonl --device cuda

Every method runs on the same frozen base, as in the paper's experiments (§4):
  closed_book  the query alone;
  prompt       the context, then the query, in the prompt (cut from the left to the window);
  prompt_oracle  the part of the context that holds the answer, alone, then the query (MSC: the
               earlier session; StreamingQA: the question's document): an upper bound that shows
               whether the base can read that kind of context at all;
  rag          the best 100-word chunk of the context by Okapi BM25, then the query;
  finetune     test-time LoRA fine-tuning of the base on the context (the paper's SFT /
               continual-pretraining baseline; few-shot fine-tuning for MetaICL);
  adapter      GenerativeAdapter: the context streams through the base once (paper §3), the
               generated adapter is merged into the weights, the query goes in alone;
  adapter_oracle  the adapter of the part that holds the answer alone (as prompt_oracle): set
               against adapter, it shows what the rest of the context costs (not run by default);
  adapter_apart  the parts (documents, sessions) each streamed alone, their states added: the
               same sum S, without reading a part under the adapter of the parts before it; set
               against adapter, it shows what reading them together does (not run by default).

Writes, under --out: predictions_{method}.jsonl, results.json and results.md (the tables
printed at the end). Reruns give the same predictions and metrics (fixed seeds, greedy).
"""

import argparse
import json
import math
import random
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from data.fresh_worlds import FreshWorlds
from data.make_world import Ladder, fewshot_context, fewshot_query
from data.readers import QARecord, read_metaicl, read_metaicl_config, read_msc, read_streamingqa
from generator import AdapterGenerator, LoRA, ingestion_flops, lora_floats, merged, split_windows
from model import (Tokenizer, Transformer, answer_text, chat_example, check_at_least, context_ids, forward_flops,
                   generate, generation_flops, kv_cache_floats, load, module_widths, query_prompt)

ROOT = Path(__file__).resolve().parent
METHODS = ("closed_book", "prompt", "prompt_oracle", "rag", "finetune", "adapter", "adapter_oracle", "adapter_apart")
PART_METHODS = ("prompt_oracle", "adapter_oracle", "adapter_apart")  # they read the parts of a context
ADAPTER_METHODS = ("adapter", "adapter_oracle", "adapter_apart")
# the tasks whose units know the parts of their context, and which part holds each answer
PART_TASKS = ("msc", "streamingqa")
DEFAULT_DATA = {"streamingqa": "data/world/streamingqa_test.csv", "metaicl": "data/world/metaicl",
                "msc": "data/world/msc_self_instruct_test.jsonl"}
MAX_NEW_TOKENS = {"streamingqa": 20, "metaicl": 10, "msc": 20, "recall": 20, "lookup": 10}
# The finetune baseline's learning rate (20 epochs), chosen on validation data: the StreamingQA
# validation CSV at 128 tokens for documents (F1 35.3 at 1e-2, 5.0 at 1e-3), six MetaICL train
# tasks for demonstrations (accuracy at K = 4 / 16: 30.0 / 40.8 at 1e-3, 37.5 / 21.7 at 1e-2; the
# look-up probe's demonstrations take MetaICL's rate).
FT_LR = {"streamingqa": 1e-2, "metaicl": 1e-3, "msc": 1e-2, "recall": 1e-2, "lookup": 1e-3}

# -----------------------------------------------------------------------------
# Metrics


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def rouge_l_recall(prediction: str, gold: str) -> float:
    """Longest common subsequence of normalised words, over the gold's length."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not ref:
        return 0.0
    lcs = [0] * (len(pred) + 1)
    for r in ref:  # one row of the LCS table at a time
        previous = 0
        for j, p in enumerate(pred, 1):
            previous, lcs[j] = lcs[j], previous + 1 if r == p else max(lcs[j], lcs[j - 1])
    return lcs[-1] / len(ref)


# answer_form's forms, as the tables name them: digits, one word, several words
ANSWER_FORMS = {"number": "a number", "word": "one word", "words": "several words"}


def answer_form(gold: str) -> str:
    """The form of an answer: a number (a year), one word (a city, a job) or several words (a
    person's or an organisation's name): a weight update writes the pieces of a new name less
    easily than one known token."""
    words = normalize_answer(gold).split()
    return "number" if gold.strip().isdigit() else "word" if len(words) == 1 else "words"


def qa_scores(prediction: str, golds: list[str]) -> dict:
    """F1, EM and ROUGE-L recall, best over all golds; F1 / EM against the shortest gold (the
    released StreamingQA evaluation's single reference); and the F1 again under the key
    f1_<form> of the first gold's answer_form, so that a mean over queries gives F1 by form."""
    shortest = min(golds, key=len)
    f1 = max(token_f1(prediction, g) for g in golds)
    return {"f1": f1, "em": max(exact_match(prediction, g) for g in golds),
            "rouge_l": max(rouge_l_recall(prediction, g) for g in golds),
            "f1_shortest": token_f1(prediction, shortest), "em_shortest": exact_match(prediction, shortest),
            f"f1_{answer_form(golds[0])}": f1}


def macro_f1(predictions: list[str], golds: list[str], options: list[str]) -> float:
    """Classification macro-F1 over the label set, as MetaICL reports it."""
    scores = []
    for label in options:
        tp = sum(p == label and g == label for p, g in zip(predictions, golds))
        fp = sum(p == label and g != label for p, g in zip(predictions, golds))
        fn = sum(p != label and g == label for p, g in zip(predictions, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


# -----------------------------------------------------------------------------
# Retrieval: Okapi BM25 over 100-word chunks


def chunk_words(text: str, size: int = 100) -> list[str]:
    words = text.split()
    return [" ".join(words[i:i + size]) for i in range(0, len(words), size)] or [""]


def bm25_scores(query: str, chunks: list[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 of each chunk for the query (idf = ln((N - n + 0.5) / (n + 0.5) + 1))."""
    docs = [normalize_answer(c).split() for c in chunks]
    avg_len = sum(map(len, docs)) / len(docs) or 1.0
    counts = [Counter(d) for d in docs]
    scores = [0.0] * len(docs)
    for term in set(normalize_answer(query).split()):
        n = sum(term in c for c in counts)
        idf = math.log((len(docs) - n + 0.5) / (n + 0.5) + 1.0)
        for i, c in enumerate(counts):
            tf = c[term]
            scores[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(docs[i]) / avg_len))
    return scores


def best_chunk(query: str, context: str) -> str:
    chunks = chunk_words(context)
    scores = bm25_scores(query, chunks)
    return chunks[max(range(len(chunks)), key=scores.__getitem__)]  # first best on ties


def wrong_in_context(prediction: str, golds: list[str], context: str) -> float:
    """1.0 when the answer is wrong but occurs word for word in the context (normalised): another
    fact of the context, such as another person's city, rather than an invented one."""
    answer = normalize_answer(prediction)
    wrong = answer and not any(exact_match(prediction, g) for g in golds)
    return float(bool(wrong) and f" {answer} " in f" {normalize_answer(context)} ")


# -----------------------------------------------------------------------------
# Tasks: units of (context, queries), each answered by every method


@dataclass
class Unit:
    """One context and the queries asked about it."""
    context: str
    queries: list[str]
    golds: list[list[str]]
    key: dict  # where the unit belongs in the tables, e.g. {"context_length": 512}
    demos: list[tuple[str, str]] = field(default_factory=list)  # MetaICL: (input, output)
    options: list[str] = field(default_factory=list)  # MetaICL classification labels
    candidates: list[list[str]] = field(default_factory=list)  # per query, gold first (gold_ranks)
    oracles: list[str] = field(default_factory=list)  # per query, the part of the context that holds its answer
    parts: list[str] = field(default_factory=list)  # the context's documents or sessions, in order
    documents: int = 0  # StreamingQA: how many documents the context joins
    # the queries' subset, whose F1, EM and wrong_in_context are given again under <metric>_<subset> (StreamingQA:
    # one_document or several_documents; recall: same_kind, another fact of the asked kind, or other_kinds)
    subset: str = ""


def group_documents(documents: list[str], lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive documents in groups of about `budget` tokens: a group takes documents while
    it stays within the budget (a longer document is a group of its own)."""
    groups, size = [], 0
    for i, n in enumerate(lengths):
        if not groups or size + n > budget:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def default_context_lengths(window: int) -> list[int]:
    """StreamingQA's default context sizes: the paper's (Fig. 3, 512 to 32K tokens), or for a base
    whose window is shorter than 512 tokens, half a window (of the tiny base) to eight windows."""
    return [512, 1024, 2048, 4096, 8192, 16384, 32768] if window >= 512 else [128, 256, 512, 1024, 2048]


def streamingqa_units(path, tokenizer: Tokenizer, context_lengths: list[int], limit: int) -> list[Unit]:
    """The unique documents in order, joined by blank lines, grouped by token budget; every
    question of a group's documents asked of that group. `limit` caps questions per budget."""
    records = read_streamingqa(path)
    documents = list(dict.fromkeys(r.document for r in records))
    lengths = [len(tokenizer.encode("\n\n" + d, bos=False)) for d in documents]
    alike = same_kind_answers(records)
    units = []
    for budget in context_lengths:
        asked = 0
        for group in group_documents(documents, lengths, budget):
            docs = {documents[i] for i in group}
            qa = [r for r in records if r.document in docs][:max(0, limit - asked)]
            if qa:
                units.append(Unit("\n\n".join(documents[i] for i in group), [r.question for r in qa],
                                  [r.answers for r in qa], {"context_length": budget},
                                  candidates=[alike(r) for r in qa], oracles=[r.document for r in qa],
                                  parts=[documents[i] for i in group], documents=len(group),
                                  subset="one_document" if len(group) == 1 else "several_documents"))
            asked += len(qa)
    return units


RANK_CANDIDATES = 16  # the gold and up to 15 other answers of the same kind


def same_kind_answers(records) -> Callable[[QARecord], list[str]]:
    """record -> [its first gold, then up to 15 first golds of other questions of the same kind]
    (a question's kind: its first two words, and whether the answer is a number: other cities
    for a birthplace question, other years for a year). Fixed per record, whatever the budget."""
    kind = lambda r: (" ".join(r.question.split()[:2]).lower(), r.answers[0].isdigit())
    by_kind = {}
    for r in records:
        by_kind.setdefault(kind(r), set()).add(r.answers[0])

    def candidates(r) -> list[str]:
        others = sorted(by_kind[kind(r)] - {r.answers[0]})
        rng = random.Random(f"{r.question}/{r.answers[0]}")
        return [r.answers[0], *rng.sample(others, min(RANK_CANDIDATES - 1, len(others)))]
    return candidates


def metaicl_units(data_dir, config_path, shots: list[int], seeds: list[int], limit: int) -> list[Unit]:
    """Every test task of the split config, seed and K: K demonstrations sampled from the seed's
    k = 16 train file, `Input: x\\nOutput: y` joined by blank lines; `limit` test queries; for a
    classification task, each query's candidates are its gold label, then the task's others."""
    units = []
    for task in read_metaicl_config(config_path)["test"]:
        for seed in seeds:
            train = read_metaicl(data_dir, task, 16, seed, "train")
            test = read_metaicl(data_dir, task, 16, seed, "test")[:limit]
            if not test:
                raise ValueError(f"{Path(data_dir) / task}/{task}_16_{seed}_test.jsonl holds no examples")
            for k in shots:
                if k > len(train):
                    raise ValueError(f"--shots {k}: {task}_16_{seed}_train.jsonl has only {len(train)} demonstrations")
                demos = [(d.input, d.output) for d in random.Random(seed * 1000 + k).sample(train, k)]
                options = test[0].options  # a classification task's labels: the gold's rank among them
                units.append(Unit(fewshot_context(demos), [fewshot_query(e.input) for e in test],
                                  [[e.output] for e in test], {"task": task, "seed": seed, "shots": k}, demos, options,
                                  [[e.output, *(o for o in options if o != e.output)] for e in test] if options else []))
    return units


def recall_units(facts: list[int], limit: int) -> list[Unit]:
    """The associative-recall probe (after Arora et al. 2023, "Zoology"): for each n in `facts`,
    `limit` contexts of n one-sentence facts about n test-split people (values drawn at random),
    each asked about one of its facts."""
    ladder, units = Ladder(), []
    for n in facts:
        for i in range(limit):
            r = ladder.recall("test", n, str(i))
            units.append(Unit(r["context"], [r["prompt"]], [[r["answer"]]], {"facts": n},
                              subset="same_kind" if r["alike"] else "other_kinds"))
    return units


def lookup_units(shots: list[int], repeat: bool, limit: int) -> list[Unit]:
    """The in-context look-up probe: for each K in `shots`, `limit` invented classifications of K
    demonstrations whose query's key is among theirs (repeat: whose query is one of their inputs),
    as MetaICL units (data/fresh_worlds.py's FreshWorlds.lookup)."""
    worlds, units = FreshWorlds(), []
    for k in shots:
        for i in range(limit):
            r = worlds.lookup(k, repeat, str(i))
            units.append(Unit(fewshot_context(r["demos"]), [fewshot_query(r["query"])], [[r["answer"]]], {"shots": k},
                              r["demos"], r["labels"], [[r["answer"], *(o for o in r["labels"] if o != r["answer"])]]))
    return units


def msc_units(path, limit: int) -> list[Unit]:
    """One unit per user: the earlier sessions as `Speaker i: text` lines, then the question."""
    units = []
    for record in read_msc(path)[:limit]:
        sessions = ["\n".join(f"{speaker}: {text}" for speaker, text in dialog) for dialog in record.previous_dialogs]
        units.append(Unit("\n\n".join(sessions), [record.question], [[record.answer]], {},
                          oracles=[oracle_session(sessions, record.answer)], parts=sessions))
    return units


def oracle_session(sessions: list[str], answer: str) -> str:
    """The session that holds the answer: the one covering most of its words (ROUGE-L recall),
    the latest on a tie."""
    return max(reversed(sessions), key=lambda session: rouge_l_recall(session, answer))


# -----------------------------------------------------------------------------
# Methods


@dataclass
class Settings:
    max_new_tokens: int
    batch_size: int
    ft_epochs: int
    ft_lr: float
    ft_rank: int
    seed: int


def fitted_prompt(tokenizer: Tokenizer, query: str, context: str, budget: int) -> list[int]:
    """The prompt with the context cut from the left (whole tokens) until it fits `budget`."""
    context_tokens = tokenizer.encode(context, bos=False)
    keep = len(context_tokens)
    while True:
        prompt = query_prompt(tokenizer, query, tokenizer.decode(context_tokens[len(context_tokens) - keep:]))
        if len(prompt) <= budget or keep == 0:
            return prompt
        keep = max(0, keep - (len(prompt) - budget))


def answer(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], settings: Settings,
           adapter=None) -> tuple[list[str], int, int]:
    """Greedy answers cut at the first newline; also tokens processed and FLOPs."""
    texts, tokens, flops = [], 0, 0
    for i in range(0, len(prompts), settings.batch_size):
        batch = prompts[i:i + settings.batch_size]
        for prompt, out in zip(batch, generate(model, batch, settings.max_new_tokens, stop=("\n",),
                                               tokenizer=tokenizer, adapter=adapter, truncate=True)):
            texts.append(answer_text(tokenizer, out))
            tokens += len(prompt) + len(out)
            flops += generation_flops(model.args, len(prompt), len(out))
    return texts, tokens, flops


def gold_ranks(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]],
               candidates: list[list[str]], adapter=None, per_token: bool = False) -> list[dict]:
    """A finer signal than F1: where the gold's log-probability ranks among answers of the same
    kind after each prompt. Per query: gold_rank, 0 when the gold is first and 1 when last
    (0.5 on average when the model knows nothing of which entity it is), and gold_top1.
    per_token scores an answer by its mean log-probability per token instead of the sum, as
    MetaICL scores a task's options (facebookresearch/MetaICL, metaicl/model.py, run_model): a sum
    favours the label of fewest tokens whatever the demonstrations show."""
    device, max_len = model.lm_head.weight.device, model.args.max_seq_len
    ranks = []
    for prompt, answers in zip(prompts, candidates):
        if len(answers) < 2:
            ranks.append({})
            continue
        ids = [tokenizer.encode(a, bos=False) for a in answers]
        rows = [(prompt + a)[-max_len:] for a in ids]
        tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        targets = torch.full_like(tokens, -100)  # each answer's tokens where they are predicted
        for i, (row, a) in enumerate(zip(rows, ids)):
            tokens[i, :len(row)] = torch.tensor(row)
            targets[i, len(row) - len(a) - 1:len(row) - 1] = torch.tensor(a)
        logits = model(tokens.to(device), adapter=adapter).float()
        logp = -F.cross_entropy(logits.mT, targets.to(device), ignore_index=-100, reduction="none").sum(1)
        if per_token:
            logp = logp / torch.tensor([len(a) for a in ids], device=device)
        above = int((logp[1:] > logp[0]).sum())
        ranks.append({"gold_rank": above / (len(answers) - 1), "gold_top1": float(above == 0)})
    return ranks


def unit_ranks(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], unit: Unit, asked,
               adapter=None) -> list[dict]:
    """gold_ranks of the unit's queries `asked` after their prompts (none without candidates); a
    few-shot unit's labels scored per token, as MetaICL scores them."""
    if not unit.candidates:
        return []
    return gold_ranks(model, tokenizer, prompts, [unit.candidates[i] for i in asked], adapter,
                      per_token=bool(unit.demos))


def finetune_lora(model: Transformer, tokenizer: Tokenizer, unit: Unit, settings: Settings) -> tuple[LoRA, int]:
    """Test-time fine-tuning (the paper's SFT / continual-pretraining baseline, §4): a LoRA of rank
    ft_rank on every linear module of every layer, trained with AdamW for a few epochs. On
    documents: next-token loss on the context in pieces of the model's length; on MetaICL: the K
    demonstrations as chat turns, loss on the outputs. Returns the LoRA and the FLOPs spent (3x
    forward per token)."""
    args, rank = model.args, settings.ft_rank
    rng = torch.Generator().manual_seed(settings.seed)
    device = model.lm_head.weight.device
    A, B = {}, {}
    for m, (d_in, d_out) in module_widths(args).items():
        A[m] = (torch.randn(1, args.n_layers, rank, d_in, generator=rng) / math.sqrt(d_in)).to(device).requires_grad_()
        B[m] = torch.zeros(1, args.n_layers, d_out, rank, device=device, requires_grad=True)
    lora = LoRA(A, B)
    if unit.demos:
        examples = [chat_example(tokenizer, fewshot_query(x), y) for x, y in unit.demos]
    else:
        ids = tokenizer.encode(unit.context)
        max_len = args.max_seq_len
        examples = [(ids[i:i + max_len], ids[i + 1:i + max_len] + [-100]) for i in range(0, len(ids), max_len)]
    optimizer = torch.optim.AdamW([*A.values(), *B.values()], lr=settings.ft_lr, weight_decay=0.0)
    flops = 0
    with torch.enable_grad():
        for _ in range(settings.ft_epochs):
            for ids, targets in examples:
                logits = model(torch.tensor([ids], device=device), adapter=lora)
                loss = F.cross_entropy(logits[0].float(), torch.tensor(targets, device=device), ignore_index=-100)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                flops += 3 * forward_flops(args, len(ids))
    return LoRA({m: a.detach() for m, a in A.items()}, {m: b.detach() for m, b in B.items()}), flops


def run_method(method: str, unit: Unit, model: Transformer, tokenizer: Tokenizer,
               generator: AdapterGenerator | None, settings: Settings) -> dict:
    """Answers a unit's queries with one method -> predictions, tokens, FLOPs, storage."""
    if method in ADAPTER_METHODS:
        contexts = unit.oracles if method == "adapter_oracle" else [unit.context] * len(unit.queries)
        return adapter_answers(unit, contexts, model, tokenizer, generator, settings, method == "adapter_apart")
    args, extra_flops, storage, adapter, held = model.args, 0, None, None, []
    prompts = [query_prompt(tokenizer, q) for q in unit.queries]
    if method in ("prompt", "prompt_oracle", "rag"):
        budget = args.max_seq_len - settings.max_new_tokens
        if method == "rag":
            contexts = [best_chunk(q, unit.context) for q in unit.queries]
        else:  # the whole context, or the part that holds each query's answer
            contexts = [unit.context] * len(unit.queries) if method == "prompt" else unit.oracles
            storage = mean(kv_cache_floats(args, len(context_ids(tokenizer, c))) for c in dict.fromkeys(contexts))
        prompts = [fitted_prompt(tokenizer, q, c, budget) for q, c in zip(unit.queries, contexts)]
        if method == "prompt" and unit.demos:
            held = [{"demos_in_prompt": demos_in_prompt(tokenizer, q, unit.demos, budget)} for q in unit.queries]
        elif method == "prompt" and unit.documents:  # the cut may take the query's own document
            held = [{"document_in_prompt": float(d in tokenizer.decode(p))} for d, p in zip(unit.oracles, prompts)]
    elif method == "finetune":
        adapter, extra_flops = finetune_lora(model, tokenizer, unit, settings)
        storage = lora_floats(adapter)
    texts, tokens, flops = answer(model, tokenizer, prompts, settings, adapter=adapter)
    ranks = unit_ranks(model, tokenizer, prompts, unit, range(len(prompts)), adapter)
    return {"predictions": texts, "ranks": ranks, "tokens": tokens, "flops": flops + extra_flops,
            "query_flops": flops / len(unit.queries), "storage_floats": storage, "held": held}


def demos_in_prompt(tokenizer: Tokenizer, query: str, demos: list[tuple[str, str]], budget: int) -> int:
    """How many demonstrations a few-shot prompt cut to `budget` tokens holds whole: the last
    ones, as many as fit beside the query (fitted_prompt cuts the earlier ones)."""
    fits = lambda n: len(query_prompt(tokenizer, query, fewshot_context(demos[len(demos) - n:]))) <= budget
    return next((n for n in range(len(demos), 0, -1) if fits(n)), 0)


def adapter_answers(unit: Unit, contexts: list[str], model: Transformer, tokenizer: Tokenizer,
                    generator: AdapterGenerator, settings: Settings, apart: bool = False) -> dict:
    """GenerativeAdapter (paper §4): each distinct context of the queries streams through the base
    once, its adapter is merged into the weights, and the queries about it go in alone. apart:
    the unit's parts stream one by one from an empty state instead, and their states add up."""
    n = len(unit.queries)
    out = {"predictions": [""] * n, "ranks": [{}] * n if unit.candidates else [], "tokens": 0, "flops": 0}
    query_flops = 0
    for context in dict.fromkeys(contexts):
        asked = [i for i, c in enumerate(contexts) if c == context]
        streams = [context_ids(tokenizer, part) for part in (unit.parts if apart else [context])]
        states = [generator.contextualize(model, ids) for ids in streams]
        lora = generator.lora(sum(states[1:], states[0]))
        prompts = [query_prompt(tokenizer, unit.queries[i]) for i in asked]
        with merged(model, lora):
            texts, tokens, flops = answer(model, tokenizer, prompts, settings)
            ranks = unit_ranks(model, tokenizer, prompts, unit, asked)
        for j, i in enumerate(asked):
            out["predictions"][i] = texts[j]
            if ranks:
                out["ranks"][i] = ranks[j]
        out["tokens"] += tokens + sum(map(len, streams))
        windows = [len(w) for ids in streams for w in split_windows(ids, generator.config.window)]
        out["flops"] += flops + ingestion_flops(model.args, generator, windows)
        query_flops += flops
    return {**out, "query_flops": query_flops / n, "storage_floats": lora_floats(lora)}


# -----------------------------------------------------------------------------
# Scoring and tables


def score_unit(unit: Unit, predictions: list[str], ranks: list[dict], held: list[dict] = ()) -> list[dict]:
    """Per-query scores: QA metrics (with the gold's rank where there are candidates, whether a
    wrong answer was taken from the context, and these three again under the unit's subset), or
    MetaICL's case-insensitive exact match; with what the cut prompt held of each query's context
    (`held`: demos_in_prompt, document_in_prompt)."""
    ranks, held = ranks or [{}] * len(predictions), held or [{}] * len(predictions)
    if unit.demos:
        majority = Counter(y for _, y in unit.demos).most_common(1)[0][0]
        return [{"accuracy": float(p.strip().lower() == g[0].strip().lower()),
                 "majority_label": float(majority == g[0]), **r, **h}
                for p, g, r, h in zip(predictions, unit.golds, ranks, held)]
    rows = [{**qa_scores(p, g), "wrong_in_context": wrong_in_context(p, g, unit.context), **r, **h}
            for p, g, r, h in zip(predictions, unit.golds, ranks, held)]
    if unit.subset:
        rows = [{**row, **{f"{m}_{unit.subset}": row[m] for m in ("f1", "em", "wrong_in_context")}} for row in rows]
    return rows


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(task: str, method: str, units: list[Unit], outputs: list[dict], wall: float, peak) -> list[dict]:
    """Result rows of one method over units sharing a table column."""
    scores = [s for o in outputs for s in o["scores"]]
    costs = {"examples": len(scores), "tokens": sum(o["tokens"] for o in outputs),
             "flops": sum(o["flops"] for o in outputs),
             "query_flops": mean(o["query_flops"] for o in outputs),
             "storage_floats": mean(o["storage_floats"] for o in outputs) if outputs[0]["storage_floats"] is not None else None,
             "wall_s": wall, "peak_mb": peak}
    if task != "metaicl":
        keys = dict.fromkeys(k for s in scores for k in s)
        return [{"method": method, **units[0].key, **{k: mean(s[k] for s in scores if k in s) for k in keys}, **costs}]
    rows = []  # per task: accuracy (and macro-F1) averaged over seeds
    for name in dict.fromkeys(u.key["task"] for u in units):
        mine = [(u, o) for u, o in zip(units, outputs) if u.key["task"] == name]
        row = {"method": method, "task": name, "shots": units[0].key["shots"],
               "accuracy": mean(mean(s["accuracy"] for s in o["scores"]) for _, o in mine),
               "classification": bool(mine[0][0].options)}
        if mine[0][0].options:
            row["macro_f1"] = mean(macro_f1([p.strip() for p in o["predictions"]], [g[0] for g in u.golds], u.options)
                                   for u, o in mine)
            row["label_top1"] = mean(mean(s["gold_top1"] for s in o["scores"]) for _, o in mine)
        if "demos_in_prompt" in mine[0][1]["scores"][0]:
            row["demos_in_prompt"] = mean(s["demos_in_prompt"] for _, o in mine for s in o["scores"])
        rows.append(row)
    summary = {"method": method, "task": "all", "shots": units[0].key["shots"],
               "accuracy": mean(r["accuracy"] for r in rows),
               "classification_accuracy": mean(r["accuracy"] for r in rows if r["classification"]),
               "non_classification_accuracy": mean(r["accuracy"] for r in rows if not r["classification"]),
               "classification_label_top1": mean(r["label_top1"] for r in rows if r["classification"]),
               **({"demos_in_prompt": mean(r["demos_in_prompt"] for r in rows)} if "demos_in_prompt" in rows[0] else {}),
               **costs}
    return rows + [summary]


def forms_tables(table, rows: list[dict], column: str) -> list[str]:
    """F1 by answer form (answer_form), one table per form that some query has."""
    return [table(f"f1_{form}", column, f"F1 on answers that are {name}")
            for form, name in ANSWER_FORMS.items()
            if any(f"f1_{form}" in r for r in rows)]


def markdown_tables(task: str, rows: list[dict]) -> str:
    """The printed tables: a metric by method and column, then the costs."""
    def table(metric, column, title, fmt="{:.1f}", scale=100.0, select=lambda r: True):
        picked = [r for r in rows if select(r) and r.get(metric) is not None and not math.isnan(r[metric])]
        columns = list(dict.fromkeys(r.get(column, "") for r in picked))
        methods = list(dict.fromkeys(r["method"] for r in picked))
        lines = [f"**{title}**", "", "| method | " + " | ".join(str(c) for c in columns) + " |",
                 "|---|" + "---|" * len(columns)]
        for m in methods:
            cells = {r.get(column, ""): r[metric] for r in picked if r["method"] == m}
            lines.append(f"| {m} | " + " | ".join(fmt.format(cells[c] * scale) if c in cells else "" for c in columns) + " |")
        return "\n".join(lines) + "\n"

    if task == "streamingqa":
        parts = [table(m, "context_length", f"{name} by context length (tokens)")
                 for m, name in (("f1", "F1"), ("em", "EM"), ("rouge_l", "ROUGE-L recall"),
                                 ("f1_shortest", "F1 vs shortest answer"),
                                 ("gold_top1", "gold answer first among 16 of its kind (%)"))]
        parts.append(table("gold_rank", "context_length", "gold answer's normalised rank among 16 of "
                           "its kind (0 = always first, 0.5 = no information)", "{:.3f}", 1.0))
        parts.append(table("wrong_in_context", "context_length", "wrong answers that occur word for word in "
                           "the context (% of questions: another document's fact)"))
        parts += [table(f"f1_{documents}", "context_length", f"F1 on questions whose context is {name}")
                  for documents, name in (("one_document", "one document"),
                                          ("several_documents", "several documents"))]
        parts.append(table("document_in_prompt", "context_length", "questions whose document the prompt holds "
                           "whole (%; the context is cut from the left to the base's window)"))
        parts += forms_tables(table, rows, "context_length")
        column = "context_length"
    elif task == "metaicl":
        summary = lambda r: r["task"] == "all"
        parts = [table("accuracy", "shots", "accuracy (all test tasks) by K", select=summary),
                 table("classification_accuracy", "shots", "classification tasks", select=summary),
                 table("non_classification_accuracy", "shots", "non-classification tasks", select=summary),
                 table("classification_label_top1", "shots", "classification tasks: the gold label scored above "
                       "the task's other labels (%; the greedy answer may be none of them)", select=summary),
                 table("demos_in_prompt", "shots", "demonstrations the prompt holds whole, on average over the "
                       "tasks (the earlier ones are cut to the base's window)", select=summary, scale=1.0)]
        column = "shots"
    elif task == "lookup":
        parts = [table("accuracy", "shots", "accuracy by demonstrations in the context"),
                 table("majority_label", "shots", "a reader that answers the demonstrations' most frequent label"),
                 table("gold_top1", "shots", "the gold label scored above the context's other labels (%)")]
        column = "shots"
    elif task == "recall":
        parts = [table(m, "facts", f"{name} by facts in the context") for m, name in (("em", "EM"), ("f1", "F1"))]
        parts += [table(f"em_{subset}", "facts", f"EM on contexts where {name}")
                  for subset, name in (("same_kind", "another fact is of the asked kind (another birthplace "
                                                     "for a birthplace)"),
                                       ("other_kinds", "every other fact is of another kind"))]
        parts.append(table("wrong_in_context_same_kind", "facts", "another fact of the context given, on contexts "
                           "where another fact is of the asked kind (% of questions)"))
        parts += forms_tables(table, rows, "facts")
        column = "facts"
    else:  # MSC: a row per method, a column per metric
        lines = [f"**MSC self-instruct ({rows[0]['examples']} users)**", "", "| method | F1 | EM | ROUGE-L recall |",
                 "|---|---|---|---|"]
        lines += [f"| {r['method']} | {100 * r['f1']:.1f} | {100 * r['em']:.1f} | {100 * r['rouge_l']:.1f} |"
                  for r in rows]
        parts = ["\n".join(lines) + "\n"]
        column = "examples"
    costs = [r for r in rows if "wall_s" in r]
    lines = ["**costs**", "", f"| method | {column} | tokens | TFLOPs | GFLOPs per query | storage per "
             "context (floats) | wall s | peak MB |", "|---|---|---|---|---|---|---|---|"]
    for r in costs:
        storage = f"{r['storage_floats']:.3g}" if r["storage_floats"] is not None else "-"
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        lines.append(f"| {r['method']} | {r.get(column, '')} | {r['tokens']} | {r['flops'] / 1e12:.4f} | "
                     f"{r['query_flops'] / 1e9:.3f} | {storage} | {r['wall_s']:.1f} | {peak} |")
    return "\n".join(parts) + "\n" + "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Command line


# Flags that only a task or a method uses: giving one that the run does not use is an error.
TASK_FLAGS = {"config": ("metaicl",), "shots": ("metaicl", "lookup"), "seeds": ("metaicl",),
              "context_lengths": ("streamingqa",), "facts": ("recall",), "query": ("lookup",)}
METHOD_FLAGS = {"generator": ADAPTER_METHODS, "ft_epochs": ("finetune",), "ft_lr": ("finetune",),
                "ft_rank": ("finetune",), "seed": ("finetune",)}


def parse_args(argv=None):
    """The flags, checked (ValueError naming the flag), with defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__, epilog=cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=["streamingqa", "metaicl", "msc", "recall", "lookup"],
                   help="the benchmark; recall: the associative-recall probe on generated facts; lookup: the "
                        "in-context look-up probe on invented classifications")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default: all of {','.join(METHODS)} but adapter_oracle "
                        f"and adapter_apart, and prompt_oracle for --task msc only; the oracle methods and "
                        f"adapter_apart for --task {' and '.join(PART_TASKS)} only)")
    p.add_argument("--base", default=None, help="base model directory (default: data/tiny)")
    p.add_argument("--generator", default=None,
                   help="generator directory, generator.json + generator.safetensors (default: data/tiny/generator)")
    p.add_argument("--data", default=None, help="dataset: the StreamingQA CSV, the MetaICL data directory "
                   f"or the MSC jsonl (default: {DEFAULT_DATA})")
    p.add_argument("--config", default=None,
                   help="MetaICL split config, {'train': [...], 'test': [...]} (default: <data>/config/world_to_world.json)")
    p.add_argument("--context_lengths", type=int, nargs="+", default=None,
                   help="StreamingQA context sizes in tokens (default: the paper's 512 ... 32768; for a base whose window "
                        "is shorter than 512 tokens, such as the tiny one, 128 ... 2048)")
    p.add_argument("--facts", type=int, nargs="+", default=None,
                   help="recall: facts per context (default: 1 2 4 8 16 32 64)")
    p.add_argument("--shots", type=int, nargs="+", default=None,
                   help="MetaICL K (default: 1 2 4 8 16); lookup: demonstrations per context (default: 2 4 8)")
    p.add_argument("--query", choices=["key", "repeat"], default=None,
                   help="lookup: the query shares its key with a demonstration (key, default) or repeats a "
                        "demonstration's input word for word (repeat: copying is all it takes)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="MetaICL seeds of the train files (default: 100 13 21 42 87)")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions per context length "
                   "(StreamingQA), test inputs per task (MetaICL), users (MSC), contexts per number of facts "
                   "(recall) or per K (lookup) (default: 150, 20, 100, 60, 100)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="answer length (default: 20; MetaICL and lookup 10)")
    p.add_argument("--batch_size", type=int, default=None, help="queries generated together (default: 16)")
    p.add_argument("--ft_epochs", type=int, default=None, help="finetune: epochs over the context (default: 20)")
    p.add_argument("--ft_lr", type=float, default=None, help="finetune: AdamW learning rate (default: 1e-3 for metaicl, 1e-2 otherwise)")
    p.add_argument("--ft_rank", type=int, default=None, help="finetune: LoRA rank on every linear module (default: 8)")
    p.add_argument("--device", default=None, help=cli.DEVICE_HELP)
    p.add_argument("--out", default=None, help="output directory (default: runs/eval/<task>)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fine-tuning baseline (default: 0)")
    args = p.parse_args(argv)
    methods = args.methods.split(",") if args.methods is not None else \
        [m for m in METHODS if m not in ("adapter_oracle", "adapter_apart")
         and (m != "prompt_oracle" or args.task == "msc")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise ValueError(f"--methods {args.methods}: expected some of {','.join(METHODS)}, each once")
    for m in PART_METHODS:
        if m in methods and args.task not in PART_TASKS:
            raise ValueError(f"--methods {m}: only --task {' or '.join(PART_TASKS)} knows the parts of "
                             "its contexts and which part holds the answer")
    for name, tasks in TASK_FLAGS.items():
        if getattr(args, name) is not None and args.task not in tasks:
            raise ValueError(f"--{name} is not used by --task {args.task} (it is for --task {' and '.join(tasks)})")
    for name, users in METHOD_FLAGS.items():
        if getattr(args, name) is not None and not set(users) & set(methods):
            named = " and ".join([", ".join(users[:-1]), users[-1]] if len(users) > 1 else users)
            raise ValueError(f"--{name} is only used by the {named} method{'s' * (len(users) > 1)}, "
                             f"which --methods {args.methods} leaves out")
    for name in ("base", "generator", "data", "config", "out"):
        if getattr(args, name) == "":
            raise ValueError(f"--{name} is empty: expected a path")
    check_at_least(args, 1, ("context_lengths", "shots", "facts", "limit", "max_new_tokens", "batch_size",
                             "ft_rank"), "--")
    check_at_least(args, 0, ("ft_epochs", "ft_lr"), "--")
    for name in ("context_lengths", "shots", "seeds", "facts"):
        values = getattr(args, name) or []
        if len(set(values)) != len(values):
            raise ValueError(f"--{name} {' '.join(map(str, values))}: a value is repeated")
    args.methods = methods
    probes = {"recall": "data/make_world.py's Ladder", "lookup": "data/fresh_worlds.py's FreshWorlds"}
    if args.task in probes and args.data is not None:
        raise ValueError(f"--data: the {args.task} probe makes its contexts ({probes[args.task]}); it reads no data")
    defaults = {
        "base": str(ROOT / "data" / "tiny"), "generator": str(ROOT / "data" / "tiny" / "generator"),
        "data": str(ROOT / DEFAULT_DATA[args.task]) if args.task in DEFAULT_DATA else None,
        "shots": [2, 4, 8] if args.task == "lookup" else [1, 2, 4, 8, 16], "seeds": [100, 13, 21, 42, 87],
        "facts": [1, 2, 4, 8, 16, 32, 64], "query": "key",
        "limit": {"streamingqa": 150, "metaicl": 20, "msc": 100, "recall": 60, "lookup": 100}[args.task],
        "max_new_tokens": MAX_NEW_TOKENS[args.task], "batch_size": 16, "ft_epochs": 20, "ft_lr": FT_LR[args.task],
        "ft_rank": 8, "seed": 0, "out": f"runs/eval/{args.task}"}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.config is None and args.task == "metaicl":
        args.config = str(Path(args.data) / "config" / "world_to_world.json")
    args.out = Path(args.out)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file: expected a directory")
    return args


@torch.no_grad()  # finetune_lora re-enables gradients for its own baseline
def main(argv=None) -> dict:
    args = parse_args(argv)
    device = cli.pick_device(args.device)
    model, tokenizer = load(args.base, device)
    if args.max_new_tokens >= model.args.max_seq_len:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: expected fewer than the base's window, "
                         f"{model.args.max_seq_len} tokens")
    generator = AdapterGenerator.load(args.generator, model.args, device) if set(ADAPTER_METHODS) & set(args.methods) else None
    if args.task == "streamingqa":
        args.context_lengths = args.context_lengths or default_context_lengths(model.args.max_seq_len)
        units = streamingqa_units(args.data, tokenizer, args.context_lengths, args.limit)
        column = "context_length"
    elif args.task == "metaicl":
        units = metaicl_units(args.data, args.config, args.shots, args.seeds, args.limit)
        column = "shots"
    elif args.task == "recall":
        units = recall_units(args.facts, args.limit)
        column = "facts"
    elif args.task == "lookup":
        units = lookup_units(args.shots, args.query == "repeat", args.limit)
        column = "shots"
    else:
        units = msc_units(args.data, args.limit)
        column = None
    if not units:
        raise ValueError(f"--data {args.data}: nothing to evaluate (no questions found)")
    settings = Settings(args.max_new_tokens, args.batch_size, args.ft_epochs, args.ft_lr, args.ft_rank, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        with open(args.out / f"predictions_{method}.jsonl", "w") as predictions:
            for value in dict.fromkeys(u.key.get(column) for u in units):
                group = [u for u in units if u.key.get(column) == value]
                started = time.time()
                outputs = []
                with cli.PeakMemory(device) as peak:
                    for unit in tqdm(group, desc=f"{method}" + (f" {column}={value}" if column else ""),
                                     unit="context", leave=False):
                        result = run_method(method, unit, model, tokenizer, generator, settings)
                        result["scores"] = score_unit(unit, result["predictions"], result.pop("ranks"),
                                                      result.pop("held", []))
                        outputs.append(result)
                        for q, p, g, s in zip(unit.queries, result["predictions"], unit.golds, result["scores"]):
                            predictions.write(json.dumps({**unit.key, "query": q, "prediction": p,
                                                          "golds": g, **s}) + "\n")
                rows += summarize(args.task, method, group, outputs, time.time() - started, peak.peak_mb)
    results = {"task": args.task, "command": " ".join(["python evaluate.py", *(argv if argv is not None else sys.argv[1:])]),
               "base": args.base, "generator": args.generator if generator else None, "data": args.data,
               "device": str(device), "torch": torch.__version__, "rows": rows}
    (args.out / "results.json").write_text(cli.strict_json(results))
    tables = markdown_tables(args.task, rows)
    (args.out / "results.md").write_text(f"`{results['command']}`\n\n{tables}")
    print(tables)
    print(f"results: {args.out / 'results.json'}, {args.out / 'results.md'}; predictions: {args.out}/predictions_*.jsonl")
    return results


if __name__ == "__main__":
    cli.run(main, "evaluate.py")
