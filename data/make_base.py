r"""Trains the tiny base model of the embedded default (from scratch, or on from a base with --init)
and writes it where model.py loads it: config.json and model.safetensors (the Hugging Face
layout), tokenizer.model, and the run's log.jsonl and validation.jsonl, in --out (default:
runs/base).

    python data/make_base.py                    # the defaults: one run of every phase, to runs/base
    python data/make_base.py --resume           # continues an interrupted run, bit for bit

The bundled base in data/tiny/ (version 3) is a run of the defaults with copy rows, lower-case
labels, invented phrasings and two rounds more, then two continuations of it (--init: a fresh
optimiser, another --seed; 1,400 and 700 few-shot-heavy steps without the invented phrasings);
about two hours on 2 CPU cores:

    python data/make_base.py --copy_rows 0.5 --lower_labels 0.5 --invented_phrasing 0.5 \
        --steps 14300 --rounds 2 --out runs/tiny/phrased
    python data/make_base.py --init runs/tiny/phrased --seed 5 --lr 5e-4 --warmup 50 --steps 1400 \
        --icl_steps 1399 --eval_interval 1400 --ckpt_interval 700 --copy_rows 0.5 --lower_labels 0.5 \
        --out runs/tiny/plain
    python data/make_base.py --init runs/tiny/plain --seed 7 --lr 5e-4 --warmup 50 --steps 700 \
        --icl_steps 699 --eval_interval 700 --ckpt_interval 700 --copy_rows 0.5 --lower_labels 0.5 \
        --out data/tiny --overwrite

The base is a 1.7M-parameter Mistral (TINY_BASE: 6 layers, width 128, grouped-query attention, tied
embeddings, a 256-token window; --layers and --width set another shape). It never reads data/world/:
it trains on text and on instruction records (context in the prompt) about worlds invented on the
fly (data/fresh_worlds.py), so every fact of the bundled datasets is unknown to it and can only come
from a context. It trains in phases, each with its own warm-up and decay: reading and mixing
(READING_MIX, then MIX), then --icl_steps few-shot-heavy steps (ICL_MIX), then --rounds more of them
at a lower learning rate. It validates on the committed validation files, whose entities it never
sees, and on fresh records of in-context learning, dialogue memory and closed-book recall.

The loop is training.py's, as train.py's is: the same checkpoint/ and logs, --resume and
--overwrite, and torchrun for several processes. Run it from the repository root after
data/make_world.py and data/make_tokenizer.py.
"""

import argparse
import math
import random
import shutil
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the library importable
import cli  # noqa: E402
from data.fresh_worlds import (COMMON_LABELS, ICL_MIX, INVENTED_LABELS, LABELS, MIX, READING_MIX,  # noqa: E402
                               FreshWorlds)
from data.make_world import WorldConfig  # noqa: E402
from data.readers import Instruction, read_instructions  # noqa: E402
from model import (ModelArgs, Tokenizer, Transformer, answer_text, chat_example, generate, query_prompt,  # noqa: E402
                   setting, user_turn)
from training import (ROOT, Batch, LoopConfig, Process, RecordBatches, Run, TextStream,  # noqa: E402
                      micro_batch_phase, next_token_targets, perplexities, prepare, train)

TINY = ROOT / "data" / "tiny"
WORLD = ROOT / "data" / "world"
# The tiny default base (Mistral architecture, grouped-query attention, a 256-token window).
TINY_BASE = ModelArgs(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384,
                      vocab_size=4096, max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5,
                      tie_embeddings=True, model_type="mistral", dtype="float32")
TEXT_ROWS = 0.25  # the share of a batch's rows that are text windows; the rest pack instruction records


@dataclass
class BaseConfig(LoopConfig):
    """make_base.py's settings, each a flag of the same name: the training loop's (LoopConfig)
    and its phases."""
    icl_steps: int = setting(0, "the N steps after reading and mixing are a phase of their own (warm-up and decay "
                                "anew) that draws its records by ICL_MIX, few-shot heavy; 0: none")
    rounds: int = setting(0, "then this many more few-shot-heavy phases of --round_steps at the peak --round_lr, "
                             "each with its own warm-up and decay (continuations of a base, in one run)")
    round_steps: int = setting(1400, "the steps of each of --rounds")
    round_lr: float = setting(5e-4, "the peak learning rate of --rounds")
    copy_rows: float = setting(0.0, "share of the text windows that are copy rows (FreshSource.copy_row): random "
                                    "pieces of words, spans of which recur later, which only a reader that "
                                    "looks content up predicts (the README's base study)")
    recall_rows: float = setting(0.0, "share of the text windows that are recall rows (FreshSource.recall_row): "
                                      "random keys and values, keys asked again, which only a reader that finds "
                                      "the key and copies the value after it predicts")
    recall_loss: str = setting("text", "where a recall row's loss is: 'text', on every token; 'answer', on the values "
                                       "of its repeated entries as the loss 'answer' (the one a record's answers "
                                       "have, as much weight as all text) and 'text' on the rest; 'asked', on "
                                       "those values alone (Zoology's labels): the rest is mostly random pieces "
                                       "no reader predicts (the README's recall study)")
    lookup_rows: float = setting(0.0, "share of the few-shot records that are look-up records (FreshWorlds' "
                                      "'lookup' kind): the query's key is among the demonstrations'")
    invented_labels: float = setting(INVENTED_LABELS, "share of the labels of invented classification tasks that "
                                                      "are invented words rather than common ones (label_word)")
    common_labels: int = setting(COMMON_LABELS, f"how many common words (the first N of fresh_worlds.LABELS, 2 to "
                                                f"{len(LABELS)}) the other labels are drawn from")
    lower_labels: float = setting(0.0, "share of the invented classification tasks that write their labels in lower "
                                       "case (fresh_worlds.invent_task)")
    invented_phrasing: float = setting(0.0, "share of the invented few-shot tasks that state their inputs in an "
                                            "invented phrasing, drawn for the task (fresh_worlds.invented_phrasing): "
                                            "roles read off the demonstrations, not off trained words")
    many_documents: float = setting(0.0, "share of the question-answering records whose context holds 2-4 documents "
                                         "(fresh_worlds.MANY_DOCUMENTS) with distractors, questions about any")
    binding_rows: float = setting(0.0, "share of the question-answering records that are binding records "
                                       "(FreshWorlds._binding): 2-6 people's facts of one kind, asked about a "
                                       "value or by it (who was born in 1936?)")
    layers: int = setting(TINY_BASE.n_layers, "the base's depth, in layers of TINY_BASE's width and heads (the "
                                              "README's base study tried 8)")
    width: int = setting(TINY_BASE.dim, "the base's width, a multiple of its 4 query heads: each head is WIDTH / 4 "
                                        "wide and the MLP 3 x WIDTH (the README's recall study tried 256)")
    text_rows: float = setting(TEXT_ROWS, "share of each batch's rows that are text windows (or copy and recall rows); "
                                          "the rest pack instruction records (1.0 with --recall_rows 1.0: recall "
                                          "rows alone, the README's recall study)")
    tokenizer: str = setting(str(TINY / "tokenizer.model"), "the sentencepiece model to train with "
                             "(data/make_tokenizer.py makes it); copied beside the base", path=True)
    init: str = setting("", "continue training a base: start from the weights in this directory (config.json + "
                            "model.safetensors, the shape of TINY_BASE with --layers and --width) instead of a "
                            "fresh draw, with a fresh optimiser and schedule (give another --seed than its run's "
                            "for new records); not read by --resume")
    redraw_alike: bool = setting(False, "with --init: draw the embeddings of the pieces the base cannot tell "
                                        "apart (alike_pieces) anew before training on, so that copy rows can "
                                        "teach it to read them")

    def __post_init__(self):
        super().__post_init__()
        if self.icl_steps < 0 or self.rounds < 0 or self.round_steps < 1 or self.round_lr <= 0:
            raise ValueError(f"--icl_steps {self.icl_steps}, --rounds {self.rounds}, --round_steps {self.round_steps}, "
                             f"--round_lr {self.round_lr}: expected counts of at least 0, at least 1 step a round "
                             "and a positive learning rate")
        if self.phases()[0] < 1:
            raise ValueError(f"--icl_steps {self.icl_steps} + --rounds {self.rounds} x --round_steps "
                             f"{self.round_steps}: expected fewer than --steps ({self.steps}), which they are part of")
        for name in ("copy_rows", "recall_rows", "lookup_rows", "invented_labels", "lower_labels",
                     "invented_phrasing", "many_documents", "binding_rows"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name} {getattr(self, name)}: expected a share from 0 to 1")
        if self.copy_rows + self.recall_rows > 1:
            raise ValueError(f"--copy_rows {self.copy_rows} + --recall_rows {self.recall_rows}: expected at most 1, "
                             "shares of the same text windows")
        if self.recall_loss not in RECALL_LOSSES:
            raise ValueError(f"--recall_loss {self.recall_loss}: expected one of {', '.join(RECALL_LOSSES)}")
        if self.layers < 1:
            raise ValueError(f"--layers {self.layers}: expected at least 1")
        if self.width < TINY_BASE.n_heads or self.width % TINY_BASE.n_heads:
            raise ValueError(f"--width {self.width}: expected a positive multiple of {TINY_BASE.n_heads}, the "
                             "base's query heads")
        if not 0 <= self.text_rows <= 1:
            raise ValueError(f"--text_rows {self.text_rows}: expected a share from 0 to 1")
        if not 1 < self.common_labels <= len(LABELS):
            raise ValueError(f"--common_labels {self.common_labels}: expected 2 to {len(LABELS)}, a number of "
                             "fresh_worlds.LABELS' words")
        if self.redraw_alike and not self.init:
            raise ValueError("--redraw_alike: expected --init too (a fresh base draws every embedding anew)")

    def shape(self) -> ModelArgs:
        """The base trained: TINY_BASE, --layers deep and --width wide."""
        return replace(TINY_BASE, n_layers=self.layers, dim=self.width, head_dim=self.width // TINY_BASE.n_heads,
                       hidden_dim=3 * self.width)

    def phases(self) -> list[int]:
        """Reading and mixing (READING_MIX, then MIX), then in-context learning (ICL_MIX): a
        phase of --icl_steps, then --rounds of --round_steps."""
        icl = [self.icl_steps] * bool(self.icl_steps) + [self.round_steps] * self.rounds
        return [self.steps - sum(icl), *icl]

    def peak_lr(self, phase: int) -> float:
        """--round_lr in the rounds, --lr before."""
        return self.round_lr if phase >= len(self.phases()) - self.rounds else self.lr


# The recipe: the defaults of this script's flags (BaseConfig's settings), flags given win.
RECIPE = dict(val_data=[str(WORLD / "pretrain_validation.jsonl.gz"), str(WORLD / "instructions_validation.jsonl")],
              out=str(ROOT / "runs" / "base"), lr=1.5e-3, warmup=100, steps=11500, icl_steps=2500, batch_size=16,
              micro_batch=16, weight_decay=0.1, eval_interval=500, eval_batches=8, log_interval=10,
              ckpt_interval=200)
# Training draws by READING_MIX first: 120,000 draws (of about 41 a step of 16 rows) are about the
# first 2,900 steps.
READING_DRAWS = 120_000
COPY_SPAN = (2, 12)  # the lengths of the spans a copy row repeats, in pieces
RECALL_VALUES = (2, 8)  # how many values a recall row's keys map to
RECALL_LOSSES = ("text", "answer", "asked")  # where a recall row's loss is (BaseConfig.recall_loss)
TASKS = ("text", "answer")  # the losses: next token of text rows, and of answers
# What validation measures on fresh records besides the files: in-context learning of invented
# tasks, dialogue memory, and closed-book answers about the library's entities never asked about.
SKILLS = ("fewshot", "dialogue", "closed_book")
VAL_QUESTIONS = 64  # questions per exact-match measure
VAL_PROMPT_TOKENS = 200  # the longest prompt (context and question) of a validation question, exclusive
ANSWER_TOKENS = 12  # greedy answers stop at a newline or after this many tokens


def parse_args(argv=None) -> BaseConfig:
    """Flags for every setting of BaseConfig, RECIPE's values their defaults."""
    defaults = cli.flag_values(BaseConfig()) | RECIPE
    parser = argparse.ArgumentParser(description=__doc__, epilog=cli.EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shown = lambda name: str(defaults[name]).replace(str(ROOT) + "/", "")  # paths as the README writes them
    cli.add_flags(parser, BaseConfig, lambda name: f" (default: {shown(name)})")
    return cli.from_flags(BaseConfig, defaults | cli.given_flags(parser, BaseConfig, argv))


# -----------------------------------------------------------------------------
# The model and its data


def init_tiny_base(args: ModelArgs) -> Transformer:
    """A fresh base: weights normal(0, 0.02), residual outputs scaled by 1 / sqrt(2 L) (GPT-2);
    the (tied) embeddings normal(0, 1 / sqrt(dim)), unit norm: the world's 60 cities and 29
    occupations are always used alike and share one learned direction, and only what is left
    of their random start tells them apart when they are copied from a context. From 0.02,
    that part stayed small (cosine 0.8 between cities) and the base never learned to copy them."""
    model = Transformer(args)
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            torch.nn.init.normal_(p, 0.0, args.dim ** -0.5)
        elif p.dim() == 2:
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            torch.nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * args.n_layers) if residual else 0.02)
    return model


def word_pieces(tokenizer: Tokenizer) -> list[int]:
    """The ids of the pieces of words: not byte, control or unknown pieces."""
    sp = tokenizer.sp
    return [i for i in range(sp.get_piece_size()) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]


class FreshSource:
    """The base stage's endless training data: text windows (alternately about fresh worlds and
    about the library, or with chance `copy` a copy row) and instruction examples of every kind
    (data/fresh_worlds.py), drawn by READING_MIX for the first `reading` draws, then by MIX, or by
    ICL_MIX while `icl` is set (mix()). Draw i of rank r is a function of (seed, r, i), so a
    counter is all the state."""

    def __init__(self, tokenizer: Tokenizer, length: int, seed: int, rank: int = 0, reading: int = 0,
                 copy: float = 0.0, lookup: float = 0.0, worlds: tuple = (), recall: float = 0.0,
                 recall_loss: str = "text"):
        self.tokenizer, self.length, self.prefix, self.reading = tokenizer, length, f"{seed}/{rank}", reading
        self.recall_loss = recall_loss
        # worlds: FreshWorlds' shares (invented_labels, lower_labels, common_labels, invented_phrasing,
        # many_documents, binding), or () for its defaults
        self.worlds = FreshWorlds(WorldConfig(), *worlds)
        self.count, self.icl, self.copy, self.recall, self.lookup = 0, False, copy, recall, lookup
        self.pieces = word_pieces(tokenizer)

    def _key(self) -> str:
        self.count += 1
        return f"{self.prefix}/{self.count}"

    def copy_row(self, rng: random.Random) -> list[int]:
        """A copy row of `length` tokens: BOS, then runs of 1-4 random pieces of words, each run
        followed half the time by a span of COPY_SPAN pieces copied from a random earlier place
        of the row. Past a span's first piece, only a reader that finds where that piece stood
        before and copies what followed it predicts the rest: look-up by content, the induction
        pattern behind copying a demonstration's format or a name from a context (Olsson et al.
        2022, "In-context learning and induction heads"), which text windows alone did not teach
        the tiny base. Every piece of the tokenizer is read, so none is left untrained."""
        ids = [self.tokenizer.bos_id]
        while len(ids) < self.length:
            ids += rng.choices(self.pieces, k=rng.randint(1, 4))
            if len(ids) > COPY_SPAN[1] and rng.random() < 0.5:
                n = rng.randint(*COPY_SPAN)
                start = rng.randrange(1, len(ids) - n + 1)
                ids += ids[start:start + n]
        return ids[:self.length]

    def recall_row(self, rng: random.Random) -> tuple[list[int], list[tuple[int, int]]]:
        """A recall row of `length` tokens, and the spans (start, length) of the values of its
        repeated entries (recall_accuracy asks them): BOS, then entries `key sep value end` of random
        pieces of words (a key of 1-3 pieces, one of RECALL_VALUES values of 1-4 pieces; sep and
        end of 1-3 and 1-2 pieces, the same for the whole row); half the entries, once there are
        two, repeat an earlier one. A repeated entry's value follows its key only through sep, as a
        demonstration's label follows its input through `Output:`, and sep is followed by every
        value of the row: a reader that copies what followed sep's last occurrence is wrong, only
        one that finds the key and skips sep is right. The multi-query associative recall of
        Arora et al. 2023 ("Zoology"), with the separator of a few-shot prompt, which copy rows
        (a span's next piece follows the piece before it) never ask for."""
        sep, end = rng.choices(self.pieces, k=rng.randint(1, 3)), rng.choices(self.pieces, k=rng.randint(1, 2))
        values = [rng.choices(self.pieces, k=rng.randint(1, 4)) for _ in range(rng.randint(*RECALL_VALUES))]
        entries, ids, asked = [], [self.tokenizer.bos_id], []
        while len(ids) < self.length:
            if len(entries) >= 2 and rng.random() < 0.5:
                key, value = rng.choice(entries)
                asked.append((len(ids) + len(key) + len(sep), len(value)))
            else:
                key, value = rng.choices(self.pieces, k=rng.randint(1, 3)), rng.choice(values)
                entries.append((key, value))
            ids += key + sep + value + end
        return ids[:self.length], [(i, min(n, self.length - i)) for i, n in asked if i < self.length]

    def row(self) -> tuple[list[int], list[int], bool]:
        """A text window of `length` tokens (BOS, then documents), or a copy or recall row; its
        answer targets (-100 where none); and whether its other tokens have the loss 'text'. Only
        a recall row has answers, its asked values' pieces where they are predicted, unless
        recall_loss is 'text'; and only under 'asked' do its other tokens have no loss."""
        L = self.length
        while True:
            key = self._key()
            rng = random.Random(f"fresh/copy/{key}")
            draw = rng.random()
            if draw < self.copy:
                return self.copy_row(rng), [-100] * L, True
            if draw < self.copy + self.recall:
                ids, asked = self.recall_row(rng)
                answer = [-100] * L
                if self.recall_loss != "text":
                    for start, n in asked:
                        answer[start - 1:start + n - 1] = ids[start:start + n]
                return ids, answer, self.recall_loss != "asked"
            ids = self.tokenizer.encode(self.worlds.text(key, library=self.count % 2 == 0))
            if len(ids) >= L:
                return ids[:L], [-100] * L, True

    def mix(self) -> dict[str, float]:
        """The shares of the record kinds of the next draw; a share `lookup` of the few-shot
        records are look-up records."""
        mix = ICL_MIX if self.icl else READING_MIX if self.count < self.reading else MIX
        if self.lookup:
            mix = mix | {"fewshot": mix["fewshot"] * (1 - self.lookup), "lookup": mix["fewshot"] * self.lookup}
        return mix

    def example(self) -> tuple[list[int], list[int]]:
        """A record in the chat template, context in the prompt, that fits `length` tokens."""
        while True:
            r = self.worlds.instruction(self._key(), self.mix())
            ids, targets = chat_example(self.tokenizer, user_turn(r["prompt"], r["context"]), r["answer"],
                                        r["follow_ups"])
            if len(ids) <= self.length:
                return ids, targets

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


class BaseBatches:
    """The training rows, one window each: a share `text_rows` are text windows (loss 'text' on
    every token; TEXT_ROWS unless told), the rest are instruction examples (chat template,
    context in the prompt) packed one after another, with the loss 'answer' on their answers and
    'text' on the rest (in a few-shot example, the demonstrations' outputs too). A recall row's
    asked values may have the loss 'answer' too, and its other tokens none (recall_loss).

    `texts` is a FreshSource (row() -> (ids, answer targets, whether the rest has the loss
    'text')) or a text stream (next() -> ids of a full window); `records` has example() -> (ids,
    answer targets).
    """

    def __init__(self, texts: TextStream | FreshSource, records: RecordBatches | FreshSource, length: int,
                 text_rows: float = TEXT_ROWS):
        self.texts, self.records, self.length, self.text_rows = texts, records, length, text_rows

    def next(self, n: int) -> Batch:
        L = self.length
        tokens = torch.zeros(n, 1, L, dtype=torch.long)
        mask = torch.zeros(n, 1, L, dtype=torch.bool)
        task = torch.zeros(n, 1, L, dtype=torch.long)
        text_loss = torch.ones(n, 1, 1, dtype=torch.bool)  # whether a row's tokens other than answers have a loss
        for i in range(n):
            if i < int(n * self.text_rows):
                ids, answer, text_loss[i] = self.text_row()
            else:  # pack whole examples; the one that does not fit is dropped
                ids, answer = [], []
                while True:
                    more, more_answer = self.records.example()
                    if len(ids) + len(more) > L:
                        break
                    ids, answer = ids + more, answer + more_answer
            tokens[i, 0, :len(ids)], mask[i, 0, :len(ids)] = torch.tensor(ids), True
            task[i, 0, :len(ids)] = (torch.tensor(answer) != -100).long()
        targets = next_token_targets(tokens, mask)  # answers' targets are their next tokens too
        targets.masked_fill_(~text_loss & (task == 0), -100)
        return Batch(tokens, mask, targets, torch.zeros(1, 1, dtype=torch.bool), task)

    def text_row(self) -> tuple[list[int], list[int], bool]:
        """The next text row, its answer targets and whether its other tokens have the loss 'text'
        (FreshSource.row; a text stream's windows have no answers)."""
        if isinstance(self.texts, FreshSource):
            return self.texts.row()
        return self.texts.next(), [-100] * self.length, True

    def state_dict(self) -> dict:
        return {"texts": self.texts.state_dict(), "records": self.records.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.texts.load_state_dict(state["texts"])
        self.records.load_state_dict(state["records"])


class FreshBatches(BaseBatches):
    """The training batches: BaseBatches of a FreshSource, which draws by ICL_MIX after the first
    phase. The state is the source's and the number of micro-batches drawn (so the phase)."""

    def __init__(self, fresh: FreshSource, config: BaseConfig, world: int = 1):
        super().__init__(fresh, fresh, fresh.length, config.text_rows)
        self.fresh, self.config, self.world, self.drawn = fresh, config, world, 0

    def next(self, n: int) -> Batch:
        self.fresh.icl = micro_batch_phase(self.drawn, self.config, self.world) >= 1
        self.drawn += 1
        return super().next(n)

    def state_dict(self) -> dict:
        return {"fresh": self.fresh.state_dict(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.fresh.load_state_dict(state["fresh"])
        self.drawn = state["drawn"]


# -----------------------------------------------------------------------------
# Training and validation


def build(config: BaseConfig, proc: Process) -> Run:
    """A fresh tiny base trained on fresh worlds (FreshSource), validated on the committed
    validation files (whose entities it never sees) and on fresh records of SKILLS."""
    device, L, shape = proc.device, TINY_BASE.max_seq_len, config.shape()
    tokenizer = Tokenizer(config.tokenizer, template="mistral")
    torch.manual_seed(config.seed)
    model = init_tiny_base(shape).to(device)

    def load_weights(path: Path) -> None:
        loaded = Transformer.from_pretrained(path, device)
        if loaded.args != shape:
            raise ValueError(f"{path}/config.json: a base of shape {loaded.args}; make_base.py trains {shape} "
                             f"(--layers {config.layers}, --width {config.width})")
        model.load_state_dict(loaded.state_dict())

    if config.init and not config.resume:
        load_weights(Path(config.init))
        if config.redraw_alike:
            redraw_alike(model, tokenizer)
    fresh = FreshSource(tokenizer, L, config.seed, proc.rank, READING_DRAWS, config.copy_rows, config.lookup_rows,
                        (config.invented_labels, config.lower_labels, config.common_labels,
                         config.invented_phrasing, config.many_documents, config.binding_rows), config.recall_rows,
                        config.recall_loss)
    texts = [p for p in config.val_data if "instructions" not in Path(p).name]
    records = [p for p in config.val_data if "instructions" in Path(p).name]
    if not texts or not records:
        raise ValueError(f"--val_data {' '.join(config.val_data)} needs text files and instruction files "
                         "(those with 'instructions' in their name)")
    examples = [chat_example(tokenizer, user_turn(r.prompt, r.context), r.answer)
                for path in records for r in read_instructions(path)]
    fitting = [e for e in examples if len(e[0]) <= L]
    questions = [r for r in read_instructions(records[0])
                 if r.context and len(tokenizer.encode(user_turn(r.prompt, r.context))) < VAL_PROMPT_TOKENS]
    questions = questions[:VAL_QUESTIONS]
    val = lambda phase: BaseBatches(TextStream(texts, tokenizer, L, 1), RecordBatches(fitting, 0, None), L)
    return Run(name="base", module=model, forward=base_forward, train=FreshBatches(fresh, config, proc.world), val=val,
               validate=partial(validate, model=model, tokenizer=tokenizer, questions=questions, worlds=fresh.worlds),
               save_weights=model.save_pretrained, load_weights=load_weights, tasks=TASKS, per_task=True)


def base_forward(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of the batch as a row of the base (or its DDP wrapper): the logits at the
    supervised positions, and 0 for the generator's SVD-guard count."""
    N, W, T = batch.tokens.shape
    logits = model(batch.tokens.view(N * W, T), logits_at=batch.supervised.view(N * W, T))
    return logits, torch.zeros((), device=batch.tokens.device)


@torch.no_grad()
def answer_accuracy(model: Transformer, tokenizer: Tokenizer, records, with_context: bool) -> float:
    """Greedy exact match of short answers, the context in the prompt or not."""
    prompts = [query_prompt(tokenizer, r.prompt, r.context if with_context else None) for r in records]
    outputs = generate(model, prompts, ANSWER_TOKENS, stop=("\n",), tokenizer=tokenizer, truncate=True)
    hits = [answer_text(tokenizer, o).lower() == r.answer.strip().lower() for o, r in zip(outputs, records)]
    return sum(hits) / len(hits)


@torch.no_grad()
def recall_accuracy(model: Transformer, tokenizer: Tokenizer, rows: int = 32) -> float:
    """Look-up through a separator in its plainest form: on `rows` fresh recall rows (drawn
    apart from training's), how often the greedy next piece after a repeated entry's key and sep
    is its value's first piece. Answering any value of the row is right about one time in four
    (RECALL_VALUES); only finding the key is right every time."""
    source = FreshSource(tokenizer, TINY_BASE.max_seq_len, 0)
    drawn = [source.recall_row(random.Random(f"fresh/recall/validation/{i}")) for i in range(rows)]
    device = model.embed_tokens.weight.device
    tokens = torch.tensor([ids for ids, _ in drawn], device=device)  # (B, L)
    predicted = model(tokens).argmax(-1)  # (B, L): the piece predicted after each position
    b, i = torch.tensor([(b, i) for b, (_, asked) in enumerate(drawn) for i, _ in asked], device=device).T
    return (predicted[b, i - 1] == tokens[b, i]).float().mean().item()


@torch.no_grad()
def alike_pieces(model: Transformer, tokenizer: Tokenizer, cosine: float = 0.95) -> list[int]:
    """The pieces of words (word_pieces) whose embedding is almost the same as another's (cosine
    above `cosine`): pieces the base cannot tell apart, hence cannot copy. A piece the base never
    reads gets only the gradient that lowers its logit everywhere, the same for every such piece,
    so these pile up on one direction."""
    words = torch.tensor(word_pieces(tokenizer))
    E = torch.nn.functional.normalize(model.embed_tokens.weight[words].float(), dim=1)  # (V', D)
    similar = E @ E.T
    similar.fill_diagonal_(-1.0)
    return words[similar.max(dim=1).values > cosine].tolist()


@torch.no_grad()
def redraw_alike(model: Transformer, tokenizer: Tokenizer) -> int:
    """Draws the embeddings of the alike pieces anew from the distribution of the pieces told
    apart (a random mix of their deviations from their mean, added to it: their mean and
    covariance): what training left in the alike ones is one shared direction, never a meaning.
    Returns how many were drawn."""
    alike = alike_pieces(model, tokenizer)
    E = model.embed_tokens.weight  # (V, D), tied to the output
    kept = E[sorted(set(word_pieces(tokenizer)) - set(alike))].float()  # (V', D)
    mean = kept.mean(dim=0)
    mix = torch.randn(len(alike), len(kept), device=E.device) / len(kept) ** 0.5
    E[alike] = (mean + mix @ (kept - mean)).to(E.dtype)
    tqdm.write(f"drew the embeddings of {len(alike)} alike pieces anew")
    return len(alike)


def validate(batches: list[Batch], step: int, *, model: Transformer, tokenizer: Tokenizer,
             questions: list[Instruction], worlds: FreshWorlds) -> dict:
    """Perplexity per task; greedy exact match on the validation questions with their context in
    the prompt and closed-book, and on fresh validation records of each of SKILLS. Printed, and
    returned for validation.jsonl; and how many pieces the base cannot tell apart (alike_pieces)
    and how often it looks a key up through a separator (recall_accuracy)."""
    ppl = perplexities(lambda b: base_forward(model, b), batches, TASKS)
    em_context = answer_accuracy(model, tokenizer, questions, with_context=True)
    em_closed = answer_accuracy(model, tokenizer, questions, with_context=False)
    skills = {kind: answer_accuracy(model, tokenizer, [Instruction(r["context"], r["prompt"], r["answer"])
                                                       for r in worlds.validation(kind, VAL_QUESTIONS)],
                                    with_context=True) for kind in SKILLS}
    alike, recall = len(alike_pieces(model, tokenizer)), recall_accuracy(model, tokenizer)
    tqdm.write(f"step {step}: text ppl {ppl['text']:.2f}, answer ppl {ppl['answer']:.2f}, "
               f"exact match with context {em_context:.1%}, closed-book {em_closed:.1%}; fresh "
               + ", ".join(f"{kind} {em:.1%}" for kind, em in skills.items())
               + f"; alike pieces {alike}; recall rows {recall:.1%}")
    return {"ppl": ppl, "exact_match_with_context": em_context, "exact_match_closed_book": em_closed,
            **{f"exact_match_fresh_{kind}": em for kind, em in skills.items()}, "alike_pieces": alike,
            "recall_rows": recall}


def finish(config: BaseConfig, model: Transformer) -> None:
    """The base written beside its tokenizer, in the layout model.py loads."""
    out = Path(config.out)
    model.save_pretrained(out)
    tokenizer = out / "tokenizer.model"
    if not (tokenizer.exists() and tokenizer.samefile(config.tokenizer)):  # the one it was trained with
        shutil.copy(config.tokenizer, tokenizer)
    print(f"the base is in {out}/ (config.json, model.safetensors, tokenizer.model)")


def main(argv=None) -> Path:
    """Trains the tiny base the flags describe; returns the directory it is written to."""
    config = parse_args(argv)
    proc = prepare(config)
    run = build(config, proc)
    train(config, run, proc)
    if proc.rank == 0:
        finish(config, run.module)
    return Path(config.out)


if __name__ == "__main__":
    cli.run(main, "make_base.py")
