"""Trains GenerativeAdapter's adapter generator on a frozen base LM (paper §3 and §4; METHOD.md
states the computation, its shapes and letters), and the tiny default base itself.

    python train.py                                    # the embedded default: tiny base, bundled
                                                       # world, both tasks, ~10 minutes on a CPU
    python train.py --stage sft --init runs/pretrain/checkpoint   # instruction tuning (paper §4)
    torchrun --nproc_per_node 8 train.py --base /models/Mistral-7B-Instruct-v0.2 \\
        --data /data/slimpajama --out runs/mistral      # the released recipe, 8 GPUs
    python train.py --stage base --overwrite           # rebuilds data/tiny's base model

Stages:
  pretrain  self-supervised completion + reconstruction (paper §3) on packed text windows;
  sft       (context, prompt, answer) records: the context as windows, the chat turn as the final
            window, loss on the answer only (paper §4);
  base      trains the tiny Mistral-architecture base of the embedded default from scratch, on
            text and instruction records (context in the prompt) about worlds invented on the fly
            (data/fresh_worlds.py), so that it knows none of the facts in data/world/.

Defaults are the authors' released configuration for a full-size base; without --base, the
embedded tiny preset (printed by --help) replaces them. Every run writes, under --out:
checkpoint/ (generator.safetensors + generator.json, trainer.pt with optimiser, RNG and data
position; replaced atomically) and log.jsonl. An --out that holds an earlier run is refused:
--resume continues that run, --overwrite deletes it and starts afresh.
"""

import argparse
import contextlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cli
from data.fresh_worlds import MIX, READING_MIX, FreshWorlds
from data.make_world import Ladder
from data.readers import Instruction, iter_texts, read_instructions
from generator import TASKS, AdapterGenerator, GeneratorConfig, pretraining_layout, split_windows
from model import (ModelArgs, Tokenizer, Transformer, answer_text, atomic_write, chat_example, check_at_least,
                   check_types, context_ids, generate, load, query_prompt, setting, user_turn)

ROOT = Path(__file__).resolve().parent
TINY = ROOT / "data" / "tiny"
WORLD = ROOT / "data" / "world"

# -----------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    """Every setting of a run, each a flag of the same name (the generator's nested in
    GeneratorConfig); the defaults are the authors' released configuration for a full-size base."""
    stage: str = setting("pretrain", "pretrain (self-supervised, paper §3), sft (instruction tuning, paper §4) "
                                     "or base (the tiny default base)")
    base: str = setting(str(TINY), "base model directory: Hugging Face (config.json + safetensors) or "
                                   "Mistral consolidated", path=True)
    data: list[str] = setting([], "training jsonl / jsonl.gz files or directories (pretrain: records with "
                                  "'text'; sft: records with 'context', 'prompt', 'answer'; the base stage "
                                  "draws fresh worlds instead)", path=True)
    val_data: list[str] = setting([], "validation files, same format as --data", path=True)
    out: str = setting("runs/pretrain", "run directory; checkpoint/ and log.jsonl go there", path=True)
    init: str = setting("", "sft: directory of the pretrained generator to start from (not read by --resume)",
                        path=True)
    curriculum: list[str] = setting([], "sft: phases RUNG:STEPS, comma separated, climbed in order: each trains "
                                        "on records of one rung of data/make_world.py's Ladder (fact, people, "
                                        "documents, streams) about the bundled world's train people, validates "
                                        "on its validation people, and restarts the learning-rate schedule; the "
                                        "steps add up to --steps. Giving --data without --curriculum trains on "
                                        "--data instead")
    resume: bool = setting(False, "continue the run in --out from its checkpoint, bit for bit")
    overwrite: bool = setting(False, "start afresh in an --out that holds an earlier run (its checkpoint or "
                                     "logs), deleting its checkpoint/, log.jsonl and validation.jsonl; without "
                                     "--resume or --overwrite such an --out is refused")
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)  # flags --k, --d_r, ...
    windows: int = setting(8, "context windows C per pretraining text")
    tasks: list[str] = setting(list(TASKS), "self-supervised tasks, comma separated: completion,reconstruction "
                                            "(either alone for the paper's ablation)")
    # optimisation
    lr: float = setting(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on norms)")
    warmup: int = setting(100, "linear warm-up steps, then cosine decay to lr / 10")
    steps: int = setting(15000, "optimiser steps")  # ~1B tokens at 8 x 8192 per step, the released budget
    epochs: int = setting(0, "sft: passes over the records, instead of --steps (0: use --steps)")
    batch_size: int = setting(8, "global batch in sequences (pretrain, base) or records (sft)")
    micro_batch: int = setting(1, "sequences per device per forward (batch_size / (micro_batch x GPUs) "
                                  "gradient-accumulation steps)")
    grad_clip: float = setting(1.0, "clip the gradient norm to this")
    seed: int = setting(0, "random seed")
    # bookkeeping
    eval_interval: int = setting(500, "validate every N steps")
    eval_batches: int = setting(20, "validation micro-batches")
    log_interval: int = setting(10, "append to log.jsonl every N steps")
    ckpt_interval: int = setting(1000, "checkpoint every N steps")
    device: str = setting("", cli.DEVICE_HELP)

    def __post_init__(self):
        """Checks every value, naming its flag: a run configured in code is checked like one
        from the command line, before anything is loaded (the generator's settings are checked
        by GeneratorConfig)."""
        check_types(self, "--")
        if self.stage not in TINY_PRESETS:
            raise ValueError(f"--stage {self.stage}: expected one of {list(TINY_PRESETS)}")
        check_at_least(self, 1, ("steps", "batch_size", "micro_batch", "windows", "eval_interval",
                                 "eval_batches", "log_interval", "ckpt_interval"), "--")
        check_at_least(self, 0, ("lr", "weight_decay", "warmup", "epochs"), "--")
        if self.grad_clip <= 0:
            raise ValueError(f"--grad_clip: expected a positive gradient norm, got {self.grad_clip}")
        if self.batch_size % self.micro_batch:
            raise ValueError(f"--batch_size {self.batch_size} is not a multiple of --micro_batch {self.micro_batch}")
        if not self.tasks or not set(self.tasks) <= set(TASKS) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks {','.join(self.tasks)}: expected completion and/or reconstruction")
        if not self.out:
            raise ValueError("--out is empty: expected the run directory")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out, --overwrite deletes it: give one of them")
        if self.stage == "sft" and not self.init and not self.resume:
            raise ValueError("--stage sft needs --init, the pretrained generator's directory")
        total = curriculum_steps(self.curriculum)
        if self.curriculum and (self.steps != total or self.epochs):
            raise ValueError(f"--steps {self.steps}: the --curriculum phases add up to {total} steps "
                             "(and set the run's length without --epochs)")


# The embedded tiny default, applied when --base is not given (flags given explicitly win).
TINY_PRESETS = {
    "pretrain": dict(data=[str(WORLD / "pretrain_train.jsonl.gz")],
                     val_data=[str(WORLD / "pretrain_validation.jsonl.gz")],
                     d_r=128, r=128, k=16, alpha=8.0, window=64, windows=4, lr=2e-3,
                     warmup=30, steps=450, batch_size=16, micro_batch=16, eval_interval=150,
                     eval_batches=4, log_interval=5, ckpt_interval=100),
    "sft": dict(data=[str(WORLD / "instructions_train.jsonl.gz")],
                val_data=[str(WORLD / "instructions_validation.jsonl")], out="runs/sft",
                init="runs/pretrain/checkpoint", lr=1e-3, warmup=30, epochs=0,
                curriculum=["fact:600", "people:1500", "documents:900"],
                batch_size=16, micro_batch=16, eval_interval=300, eval_batches=4,
                log_interval=5, ckpt_interval=300),
    "base": dict(val_data=[str(WORLD / "pretrain_validation.jsonl.gz"), str(WORLD / "instructions_validation.jsonl")],
                 out=str(TINY), lr=1.5e-3, warmup=100, steps=9000, batch_size=16, micro_batch=16,
                 weight_decay=0.1, eval_interval=500, eval_batches=8, log_interval=10,
                 ckpt_interval=200),
}
# The released instruction tuning of a full-size base (paper §4, and the authors' released code).
SFT_RELEASED = dict(lr=5e-5, epochs=2, batch_size=32)
# The base stage draws by READING_MIX first: 120,000 draws (of about 41 a step of 16 rows) are about
# the first 2,900 steps.
BASE_READING_DRAWS = 120_000
# The tiny default base (Mistral architecture, grouped-query attention, a 256-token window).
TINY_BASE = ModelArgs(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384,
                      vocab_size=4096, max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5,
                      tie_embeddings=True, model_type="mistral", dtype="float32")


# Flags a stage has no use for, and why: giving one is an error rather than silently ignored.
GENERATOR_FLAGS = tuple(f.name for f in fields(GeneratorConfig))
UNUSED_FLAGS = {
    "pretrain": (("init", "epochs", "curriculum"), "it is for --stage sft"),
    "sft": ((*GENERATOR_FLAGS, "windows", "tasks"),
            "the generator's settings come from --init, and --windows and --tasks are pretraining's"),
    "base": (("base", "data", "init", "epochs", "curriculum", *GENERATOR_FLAGS, "windows", "tasks"),
             "it trains the tiny default base on fresh worlds, data/fresh_worlds.py"),
}


def default_note(name: str, default) -> str:
    """What --help adds to a flag's text: its default, and the tiny presets' values."""
    tiny = {s: p[name] for s, p in TINY_PRESETS.items() if name in p}
    tiny = json.loads(json.dumps(tiny).replace(str(ROOT) + "/", ""))  # paths as the README writes them
    return f" (default: {default}" + (f"; without --base: {tiny}" if tiny else "") + ")"


def parse_args(argv=None) -> TrainConfig:
    """Flags for every TrainConfig setting; defaults: released values, or the tiny preset. Every
    flag given is used or refused (ValueError naming it)."""
    defaults = cli.flag_values(TrainConfig())
    parser = argparse.ArgumentParser(description=__doc__, epilog=cli.EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, TrainConfig, lambda name: default_note(name, defaults[name]))
    given = cli.given_flags(parser, TrainConfig, argv)
    stage = given.get("stage", defaults["stage"])
    unused, why = UNUSED_FLAGS.get(stage, ((), ""))
    for name in unused:
        if name in given:
            raise ValueError(f"--{name} is not used by --stage {stage} ({why})")
    if "steps" in given and given.get("epochs"):
        raise ValueError("--steps and --epochs both set the length of the run: give one of them")
    if "steps" in given:
        given["epochs"] = 0  # a given --steps wins over the released sft recipe's epochs
    preset = TINY_PRESETS.get(stage, {}) if "base" not in given else (SFT_RELEASED if stage == "sft" else {})
    if "data" in given and "curriculum" not in given:
        preset = {k: v for k, v in preset.items() if k != "curriculum"}  # --data replaces the ladder
    merged = {**defaults, **preset, **given}
    if merged["curriculum"]:
        if given.get("epochs"):
            raise ValueError("--epochs: a --curriculum sets the run's length by its phases' steps")
        merged |= {"steps": given.get("steps", curriculum_steps(merged["curriculum"])), "epochs": 0}
    config = cli.from_flags(TrainConfig, merged)
    if stage != "base" and "base" in given and not config.data and not config.curriculum:
        raise ValueError("--data (or, for sft, --curriculum) is required with --base "
                         "(the bundled data is for the tiny base)")
    return config


# -----------------------------------------------------------------------------
# Data: packed text, the self-supervised tasks' windows, instruction records


class TextStream:
    """Documents (BOS + text + EOS) from jsonl files, packed into sequences of `length` tokens.

    Rank r of `world` takes records r, r + world, ...; documents shorter than `min_tokens` are
    skipped and counted. The stream restarts at the end of the data (a new epoch); its position
    is a small state (records read, leftover tokens) that a checkpoint stores.
    """

    def __init__(self, paths, tokenizer: Tokenizer, length: int, min_tokens: int, rank=0, world=1):
        self.paths, self.tokenizer, self.length, self.min_tokens = paths, tokenizer, length, min_tokens
        self.rank, self.world = rank, world
        self.position, self.epoch, self.skipped, self.buffer = 0, 0, 0, []
        self._records = None

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "skipped": self.skipped,
                "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.epoch, self.skipped = state["position"], state["epoch"], state["skipped"]
        self.buffer, self._records = list(state["buffer"]), None

    def _next_document(self) -> list[int]:
        used_this_pass = self.position > 0
        while True:
            if self._records is None:
                self._records = enumerate(iter_texts(self.paths))
            for index, text in self._records:
                if index < self.position or index % self.world != self.rank:
                    continue
                self.position = index + 1
                ids = self.tokenizer.encode(text, bos=True, eos=True)
                if len(ids) < self.min_tokens:
                    self.skipped += 1
                    continue
                return ids
            if not used_this_pass:
                raise ValueError(f"{self.paths}: no document of at least {self.min_tokens} tokens "
                                 f"for rank {self.rank} of {self.world} ({self.skipped} too short)")
            self._records, self.position, self.epoch, used_this_pass = None, 0, self.epoch + 1, False

    def next(self) -> list[int]:
        while len(self.buffer) < self.length:
            self.buffer += self._next_document()
        sequence, self.buffer = self.buffer[:self.length], self.buffer[self.length:]
        return sequence


@dataclass
class Batch:
    """Windows run as independent sequences. tokens, mask, targets: (N, W, w); visible: (W, W);
    task: which loss each target counts in (an index into the stage's task names), broadcastable
    to (N, W, w): (W, 1) per window, or per token; targets -100 where nothing is predicted."""
    tokens: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    visible: torch.Tensor
    task: torch.Tensor

    @property
    def supervised(self) -> torch.Tensor:
        """(N, W, w) bool: where a target is predicted (the only logits a loss needs)."""
        return self.targets != -100

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def pretraining_example(sequence: list[int], C: int, w: int, tasks, rng: torch.Generator):
    """One text of C * w tokens -> tokens, mask, targets (W, w) of the self-supervised tasks
    (paper §3; pretraining_layout gives which windows each one sees).

    Reconstruction window i (1-based) is a span of the text seen so far: its start is uniform
    over the first i * w tokens, and it is cut at min(start + w, i * w), then right-padded.
    """
    text = torch.tensor(sequence).view(C, w)
    tokens, mask = [text], [torch.ones(C, w, dtype=torch.bool)]
    if "reconstruction" in tasks:
        spans = torch.zeros(C, w, dtype=torch.long)
        span_mask = torch.zeros(C, w, dtype=torch.bool)
        flat = text.flatten()
        for i in range(1, C + 1):
            start = int(torch.randint(0, i * w, (1,), generator=rng))
            end = min(start + w, i * w)
            spans[i - 1, :end - start] = flat[start:end]
            span_mask[i - 1, :end - start] = True
        tokens.append(spans)
        mask.append(span_mask)
    tokens, mask = torch.cat(tokens), torch.cat(mask)
    targets = next_token_targets(tokens, mask)
    if "completion" not in tasks:  # the ablation: completion windows still give context
        targets[:C] = -100
    return tokens, mask, targets


def next_token_targets(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """targets[..., t] = tokens[..., t + 1] within each window, -100 where there is none."""
    targets = torch.full_like(tokens, -100)
    targets[..., :-1] = tokens[..., 1:].masked_fill(~mask[..., 1:], -100)
    return targets


def sft_example(tokenizer: Tokenizer, record, w: int):
    """An instruction-tuning example (paper §4): the context as a user turn split into windows,
    then the prompt + answer window.

    Returns the context windows (lists of ids) and the final window's ids and targets, or None
    when the prompt and answer do not fit in one window.
    """
    context = context_ids(tokenizer, record.context)
    ids, targets = chat_example(tokenizer, record.prompt, record.answer)
    if len(ids) > w:
        return None
    return split_windows(context, w), ids, targets


def sft_size(example) -> tuple[int, int]:
    """What sft_batch pads to: the number of windows, then the longest window."""
    windows, ids, _ = example
    return len(windows), max(len(x) for x in [*windows, ids])


def sft_batch(examples, pad_id: int = 0) -> Batch:
    """Collates sft_example's examples: context windows first, empty windows, the final window
    last, so that every window sees the strictly earlier ones (empty windows add nothing)."""
    W = max(len(windows) for windows, _, _ in examples) + 1
    w = max(len(x) for windows, ids, _ in examples for x in [*windows, ids])
    tokens = torch.full((len(examples), W, w), pad_id)
    mask = torch.zeros(len(examples), W, w, dtype=torch.bool)
    targets = torch.full((len(examples), W, w), -100)
    for n, (windows, ids, target) in enumerate(examples):
        for j, window in enumerate(windows):
            tokens[n, j, :len(window)] = torch.tensor(window)
            mask[n, j, :len(window)] = True
        tokens[n, -1, :len(ids)] = torch.tensor(ids)
        mask[n, -1, :len(ids)] = True
        targets[n, -1, :len(target)] = torch.tensor(target)
    task = torch.zeros(W, 1, dtype=torch.long)
    return Batch(tokens, mask, targets, torch.ones(W, W).tril(-1).bool(), task)


# -----------------------------------------------------------------------------
# Batch sources (each with a state for exact resumption)


class PretrainBatches:
    """Micro-batches of pretraining examples from a TextStream, with the given tasks' windows."""

    def __init__(self, stream: TextStream, config: TrainConfig, seed: int, tasks=None):
        self.stream, self.config, self.tasks = stream, config, tasks or config.tasks
        self.rng = torch.Generator().manual_seed(seed)
        self.visible, self.task = pretraining_layout(config.windows, self.tasks)

    def next(self, n: int) -> Batch:
        c = self.config
        parts = [pretraining_example(self.stream.next(), c.windows, c.generator.window, self.tasks, self.rng)
                 for _ in range(n)]
        tokens, mask, targets = (torch.stack(p) for p in zip(*parts))
        return Batch(tokens, mask, targets, self.visible, self.task[:, None])

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.rng.set_state(state["rng"])


class RecordBatches:
    """Micro-batches of examples, reshuffled every epoch; rank r takes every world-th.

    With `size` (example -> sortable size), each block of 64 micro-batches is sorted by size,
    cut into micro-batches and those are shuffled: batches of similar examples pad less (the
    bundled SFT examples span 1 to 12 context windows; in micro-batches of 16 this cuts the
    padded share of tokens from 62% to 17%)."""

    def __init__(self, examples: list, seed: int, collate, rank=0, world=1, size=None, micro_batch=1):
        if len(examples) < world:
            raise ValueError(f"{len(examples)} examples cannot be shared among {world} processes")
        self.examples, self.seed, self.collate, self.rank, self.world = examples, seed, collate, rank, world
        self.size, self.micro_batch = size, micro_batch
        self.epoch, self.position, self.order = 0, 0, None

    def _order(self) -> list[int]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        order = order[self.rank::self.world]
        if self.size is None:
            return order
        n, block = self.micro_batch, 64 * self.micro_batch
        chunks = []
        for i in range(0, len(order), block):
            ranked = sorted(order[i:i + block], key=lambda j: self.size(self.examples[j]))
            chunks += [ranked[j:j + n] for j in range(0, len(ranked), n)]
        rng.shuffle(chunks)
        return [j for chunk in chunks for j in chunk]

    def take(self, n: int) -> list:
        chosen = []
        while len(chosen) < n:
            if self.order is None:
                self.order = self._order()
            if self.position >= len(self.order):
                self.epoch, self.position, self.order = self.epoch + 1, 0, None
                continue
            chosen.append(self.examples[self.order[self.position]])
            self.position += 1
        return chosen

    def next(self, n: int) -> Batch:
        return self.collate(self.take(n))

    def example(self):
        return self.take(1)[0]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.order = state["epoch"], state["position"], None


class CurriculumBatches:
    """The sft micro-batches of a --curriculum. When phase i starts, it makes steps_i x batch_size
    records of its Ladder rung (record j a function of the seed and j) and serves them through
    RecordBatches; the state is the number of micro-batches drawn and that phase's position."""

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer, w: int, accum: int, rank=0, world=1):
        self.config, self.tokenizer, self.w, self.accum, self.rank, self.world = config, tokenizer, w, accum, rank, world
        self.ladder, self.drawn, self.phase, self.batches = Ladder(), 0, None, None

    def examples(self, phase: int, split: str, n: int) -> list:
        """SFT examples of the first n records of a phase's rung that fit (split: train or validation)."""
        rung = curriculum_phases(self.config.curriculum)[phase][0]
        records = (Instruction(**self.ladder.record(rung, split, f"{self.config.seed}/{j}")) for j in range(n))
        return [e for e in (sft_example(self.tokenizer, r, self.w) for r in records) if e is not None]

    def _enter(self, phase: int) -> None:
        steps = curriculum_phases(self.config.curriculum)[phase][1]
        examples = self.examples(phase, "train", steps * self.config.batch_size)
        self.phase, self.batches = phase, RecordBatches(examples, self.config.seed, sft_batch, self.rank,
                                                        self.world, sft_size, self.config.micro_batch)

    def next(self, n: int) -> Batch:
        phase = phase_at(self.drawn // self.accum, self.config)[0]
        if phase != self.phase:
            self._enter(phase)
        self.drawn += 1
        return self.batches.next(n)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "phase": self.phase,
                "batches": self.batches.state_dict() if self.batches else None}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.phase, self.batches = state["drawn"], None, None
        if state["phase"] is not None:
            self._enter(state["phase"])
            self.batches.load_state_dict(state["batches"])


class FreshSource:
    """The base stage's endless training data: text windows (alternately about fresh worlds and
    about the library) and instruction examples of every kind (data/fresh_worlds.py), drawn by
    READING_MIX for the first `reading` draws, then by MIX. Draw i of rank r is a function of
    (seed, r, i), so a counter is all the state."""

    def __init__(self, tokenizer: Tokenizer, length: int, seed: int, rank: int = 0, reading: int = 0):
        self.tokenizer, self.length, self.prefix, self.reading = tokenizer, length, f"{seed}/{rank}", reading
        self.worlds, self.count = FreshWorlds(), 0

    def _key(self) -> str:
        self.count += 1
        return f"{self.prefix}/{self.count}"

    def next(self) -> list[int]:
        """A text window of `length` tokens (BOS, then documents)."""
        while True:
            key = self._key()
            ids = self.tokenizer.encode(self.worlds.text(key, library=self.count % 2 == 0))
            if len(ids) >= self.length:
                return ids[:self.length]

    def example(self) -> tuple[list[int], list[int]]:
        """A record in the chat template, context in the prompt, that fits `length` tokens."""
        while True:
            r = self.worlds.instruction(self._key(), READING_MIX if self.count < self.reading else MIX)
            ids, targets = chat_example(self.tokenizer, user_turn(r["prompt"], r["context"]), r["answer"],
                                        r["follow_ups"])
            if len(ids) <= self.length:
                return ids, targets

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


class BaseBatches:
    """The base stage's rows, one window each: a quarter are text windows (loss 'text' on every
    token), the rest are instruction examples (chat template, context in the prompt)
    packed one after another, with the loss 'answer' on their answers and 'text' on the rest
    (in a few-shot example, the demonstrations' outputs too).

    `texts` has next() -> ids of a full window; `records` has example() -> (ids, answer targets).
    """

    def __init__(self, texts, records, length: int):
        self.texts, self.records, self.length = texts, records, length

    def next(self, n: int) -> Batch:
        L = self.length
        tokens = torch.zeros(n, 1, L, dtype=torch.long)
        mask = torch.zeros(n, 1, L, dtype=torch.bool)
        task = torch.zeros(n, 1, L, dtype=torch.long)
        for i in range(n):
            if i < n // 4:
                ids, answer = self.texts.next(), [-100] * L
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
        return Batch(tokens, mask, targets, torch.zeros(1, 1, dtype=torch.bool), task)

    def state_dict(self) -> dict:
        return {"texts": self.texts.state_dict(), "records": self.records.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.texts.load_state_dict(state["texts"])
        self.records.load_state_dict(state["records"])


def load_sft_examples(paths, tokenizer: Tokenizer, w: int) -> tuple[list, int]:
    """sft_example's examples of every record whose prompt and answer fit one window; and how many
    records were skipped for not fitting."""
    examples, skipped = [], 0
    for path in paths:
        for record in read_instructions(path):
            example = sft_example(tokenizer, record, w)
            if example is None:
                skipped += 1
            else:
                examples.append(example)
    if not examples:
        raise ValueError(f"{paths}: no instruction record fits a window of {w} tokens")
    return examples, skipped


# -----------------------------------------------------------------------------
# Loss, optimiser, schedule


def task_losses(logits: torch.Tensor, batch: Batch, n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and token counts per task (n_tasks,), float32, from the
    logits (n, V) at the n supervised positions of the batch."""
    supervised = batch.supervised
    ce = F.cross_entropy(logits.float(), batch.targets[supervised], reduction="none")  # (n,)
    task = batch.task.expand_as(batch.targets)[supervised]
    zeros = torch.zeros(n_tasks, device=ce.device)
    return zeros.index_add(0, task, ce), zeros.index_add(0, task, torch.ones_like(ce))


def make_optimizer(module: torch.nn.Module, config: TrainConfig):
    """AdamW over the trainable parameters; weight decay on matrices, not on norm weights."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "norm" not in n], "weight_decay": config.weight_decay},
              {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def curriculum_phases(curriculum: list[str]) -> list[tuple[str, int]]:
    """["fact:1500", ...] -> [("fact", 1500), ...]; ValueError naming what is wrong."""
    phases = []
    for phase in curriculum:
        rung, _, steps = phase.partition(":")
        if rung not in Ladder.RUNGS or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"--curriculum {','.join(curriculum)}: '{phase}' is not RUNG:STEPS with RUNG "
                             f"in {list(Ladder.RUNGS)} and STEPS > 0")
        phases.append((rung, int(steps)))
    return phases


def curriculum_steps(curriculum: list[str]) -> int:
    """The optimiser steps of a curriculum: its phases' steps added up."""
    return sum(steps for _, steps in curriculum_phases(curriculum))


def phase_at(step: int, config: TrainConfig) -> tuple[int, int, int]:
    """The curriculum phase that optimiser step `step` (0-based) belongs to: (index, first step,
    length); one phase of all the steps without a curriculum."""
    phases, start = curriculum_phases(config.curriculum) or [("", config.steps)], 0
    for i, (_, steps) in enumerate(phases):
        if step < start + steps or i == len(phases) - 1:
            return i, start, steps
        start += steps


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak; anew in each curriculum phase."""
    _, start, length = phase_at(step, config)
    step -= start
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, length - config.warmup))
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def combine(sums: torch.Tensor, counts: torch.Tensor, per_task: bool) -> torch.Tensor:
    """The loss: the mean over all supervised tokens of both tasks (paper §3), or the sum of each
    task's mean (the base stage, so that short answers weigh as much as long texts)."""
    if per_task:
        return (sums / counts.clamp_min(1)).sum()
    return sums.sum() / counts.sum().clamp_min(1)


# -----------------------------------------------------------------------------
# Training step and validation


def train_step(forward, params, micro_batches: list[Batch], optimizer, lr: float,
               config: TrainConfig, n_tasks: int, sync_module=None, per_task=False):
    """One optimiser step over micro-batches (gradient accumulation).

    Args:
        forward: batch -> (logits (n, V) at the batch's n supervised positions, guard count).
        params: the trained parameters (for clipping).
        n_tasks: how many task indices batches carry (losses are reported per task).
        sync_module: the DDP module: gradients are all-reduced on the last micro-batch only.
    Returns:
        per-task loss sums and token counts, guard count and gradient norm (tensors, no sync).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = counts = fired = 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        no_sync = sync_module.no_sync() if sync_module is not None and not last else contextlib.nullcontext()
        with no_sync, cli.autocast(batch.tokens.device):
            logits, f = forward(batch)
            s, c = task_losses(logits, batch, n_tasks)
            (combine(s, c, per_task) / len(micro_batches)).backward()
        sums, counts, fired = sums + s.detach(), counts + c, fired + f
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, counts, fired, grad_norm


@torch.no_grad()
def perplexities(forward, batches: list[Batch], names) -> dict:
    """Perplexity per task over validation batches."""
    sums = counts = 0
    for batch in batches:
        with cli.autocast(batch.tokens.device):
            s, c = task_losses(forward(batch)[0], batch, len(names))
        sums, counts = sums + s, counts + c
    return {name: math.exp(min(50.0, float(s / c))) for name, s, c in zip(names, sums, counts) if c > 0}


@torch.no_grad()
def answer_accuracy(model: Transformer, tokenizer: Tokenizer, records, with_context: bool) -> float:
    """Greedy exact match of short answers, the context in the prompt or not (base stage)."""
    prompts = [query_prompt(tokenizer, r.prompt, r.context if with_context else None) for r in records]
    outputs = generate(model, prompts, 12, stop=("\n",), tokenizer=tokenizer, truncate=True)
    hits = [answer_text(tokenizer, o).lower() == r.answer.strip().lower() for o, r in zip(outputs, records)]
    return sum(hits) / len(hits)


# -----------------------------------------------------------------------------
# Checkpoints: a directory replaced atomically


def save_checkpoint(out: Path, save_weights, trainer_state: dict) -> None:
    """Writes checkpoint.tmp/ completely, then swaps it in for checkpoint/: an interrupted
    write leaves the previous checkpoint (checkpoint/ or, mid-swap, checkpoint.old/) intact."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(tmp)
    torch.save(trainer_state, tmp / "trainer.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path) -> Path:
    for candidate in (out / "checkpoint", out / "checkpoint.old"):
        if (candidate / "trainer.pt").is_file():
            return candidate
    raise FileNotFoundError(f"--resume: no checkpoint in {out} (expected {out / 'checkpoint'}/trainer.pt)")


def read_trainer_state(file: Path) -> dict:
    """trainer.pt, checked to be readable and complete; errors name the file."""
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        reason = str(err).split(". ")[0] or type(err).__name__
        raise ValueError(f"{file}: not a readable trainer state (truncated or corrupt?): {reason}") from None
    missing = [k for k in ("step", "optimizer", "ranks", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{file}: not a trainer state written by train.py (missing {missing})")
    return state


RUN_FILES = ("checkpoint", "checkpoint.old", "log.jsonl", "validation.jsonl")


def check_run_directory(out: Path, config: TrainConfig) -> None:
    """A new run may not start where an earlier one left its checkpoint or logs: the checkpoint
    would be replaced and the two runs' logs mixed. --resume continues the earlier run (which must
    have a checkpoint), --overwrite deletes it (clear_run) once the new run has read its data."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: expected a run directory")
    if config.resume:
        find_checkpoint(out)
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not config.overwrite:
        raise ValueError(f"--out {out} holds an earlier run ({', '.join(found)}): pass --resume to "
                         "continue it, or --overwrite to delete it and start afresh")


def clear_run(out: Path) -> None:
    """--overwrite: deletes an earlier run's checkpoints and logs, and nothing else in --out."""
    for path in (out / name for name in (*RUN_FILES, "checkpoint.tmp")):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# Settings a resumed run may change; the others must be those of the checkpoint. --out and --init
# are not compared: the run resumes from the --out it is given, and --init is read at the start only.
RESUMABLE_CHANGES = {"resume", "overwrite", "out", "init", "steps", "eval_interval", "eval_batches",
                     "log_interval", "ckpt_interval", "device"}
PATH_FIELDS = ("base", "data", "val_data", "out", "init")


def portable(path: str, start: Path) -> str:
    """A path as a checkpoint records it: relative to the repository when inside it, else absolute
    (a relative path being read from `start`). A moved checkout or run directory still resumes."""
    if not path:
        return path
    full = (start / path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(full)


def recorded_config(config: dict, start: Path) -> dict:
    """A TrainConfig as a dict, with its paths made portable."""
    paths = {k: [portable(p, start) for p in v] if isinstance(v, list) else portable(v, start)
             for k, v in config.items() if k in PATH_FIELDS}
    return {**config, **paths}


def check_resumed_config(saved: dict, config: TrainConfig) -> None:
    """A resumed run must keep its hyperparameters; changing the step budget only warns. The
    checkpoint's paths are portable (relative to the repository); the current ones are made so."""
    saved, current = recorded_config(saved, ROOT), recorded_config(cli.flag_values(config), Path.cwd())
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        raise ValueError("--resume with different hyperparameters: " + ", ".join(
            f"--{k} was {saved.get(k)!r}, now {current[k]!r}" for k in changed))
    if saved["steps"] != config.steps:
        print(f"warning: --steps changed from {saved['steps']} to {config.steps}: "
              "the learning-rate schedule changes from here on", file=sys.stderr)


# -----------------------------------------------------------------------------
# Set-up


def setup_distributed(config: TrainConfig):
    """Rank, world size and device, from torchrun's environment when present."""
    device = cli.pick_device(config.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


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


@dataclass
class Run:
    """What a stage trains: the module (unwrapped), its DDP wrapper when distributed, the
    forward over a batch, the training batch source and the validation one (a function of the
    curriculum phase), the frozen base, the tokenizer, the task names."""
    module: torch.nn.Module
    ddp: DDP | None
    forward: object
    train: object
    val: object
    base: Transformer | None
    tokenizer: Tokenizer
    tasks: tuple
    save_weights: object


def build(config: TrainConfig, rank: int, world: int, device: torch.device) -> Run:
    if config.stage == "base":
        return build_base(config, rank, world, device)
    base, tokenizer = load(config.base, device, cli.compute_dtype(device))
    base.checkpointing = device.type == "cuda"  # recompute the base's layers in backward
    torch.manual_seed(config.seed)  # the generator's initialisation and the randomised SVDs' draws
    if config.stage == "pretrain":
        generator = AdapterGenerator(base.args, config.generator).to(device)
        w = config.generator.window
        length = config.windows * w
        train = PretrainBatches(TextStream(config.data, tokenizer, length, w, rank, world),
                                config, config.seed + rank)
        # validation measures both tasks whatever --tasks trains (the paper's Table 2 ablation)
        val = lambda phase: PretrainBatches(TextStream(config.val_data, tokenizer, length, w),
                                            config, 12345, TASKS)
    else:  # resuming, the checkpoint's generator (its weights are restored again by resume())
        start = find_checkpoint(Path(config.out)) if config.resume else config.init
        generator = AdapterGenerator.load(start, base.args, device)
        w = generator.config.window
        if config.curriculum:
            train = CurriculumBatches(config, tokenizer, w, config.batch_size // (config.micro_batch * world),
                                      rank, world)
            n_val = config.eval_batches * config.micro_batch
            val = lambda phase: RecordBatches(train.examples(phase, "validation", n_val), 0, sft_batch)
        else:
            examples, skipped = load_sft_examples(config.data, tokenizer, w)
            if skipped and rank == 0:
                print(f"sft: skipped {skipped} records whose prompt and answer exceed one window")
            train = RecordBatches(examples, config.seed, sft_batch, rank, world, sft_size, config.micro_batch)
            val = lambda phase: RecordBatches(load_sft_examples(config.val_data, tokenizer, w)[0], 0, sft_batch)
    ddp = DDP(generator, device_ids=[device] if device.type == "cuda" else None) if world > 1 else None
    trained = ddp or generator

    def forward(batch: Batch):
        return trained(base, batch.tokens, batch.mask, batch.visible, batch.supervised)
    tasks = TASKS if config.stage == "pretrain" else ("answer",)
    return Run(generator, ddp, forward, train, val, base, tokenizer, tasks, generator.save)


def build_base(config: TrainConfig, rank: int, world: int, device: torch.device) -> Run:
    """The base stage: a fresh tiny base trained on fresh worlds (FreshSource), validated on the
    committed validation files (whose entities it never sees)."""
    tokenizer = Tokenizer(TINY / "tokenizer.model", template="mistral")
    torch.manual_seed(config.seed)
    model = init_tiny_base(TINY_BASE).to(device)
    L = TINY_BASE.max_seq_len
    fresh = FreshSource(tokenizer, L, config.seed, rank, BASE_READING_DRAWS)
    train = BaseBatches(fresh, fresh, L)
    texts = [p for p in config.val_data if "instructions" not in Path(p).name]
    records = [p for p in config.val_data if "instructions" in Path(p).name]
    if not texts or not records:
        raise ValueError(f"--stage base: --val_data {' '.join(config.val_data)} needs text files and "
                         "instruction files (those with 'instructions' in their name)")
    examples = [chat_example(tokenizer, user_turn(r.prompt, r.context), r.answer)
                for path in records for r in read_instructions(path)]
    fitting = [e for e in examples if len(e[0]) <= L]
    val = lambda phase: BaseBatches(TextStream(texts, tokenizer, L, 1), RecordBatches(fitting, 0, None), L)
    ddp = DDP(model) if world > 1 else None
    trained = ddp or model

    def forward(batch: Batch):
        N, W, T = batch.tokens.shape
        return trained(batch.tokens.view(N * W, T), logits_at=batch.supervised.view(N * W, T)), \
            torch.zeros((), device=device)
    return Run(model, ddp, forward, train, val, None, tokenizer, ("text", "answer"), model.save_pretrained)


# -----------------------------------------------------------------------------
# The loop


def main(argv=None) -> Path:
    config = parse_args(argv)
    rank, world, device = setup_distributed(config)
    accum = config.batch_size // (config.micro_batch * world)
    if accum * config.micro_batch * world != config.batch_size:
        raise ValueError(f"--batch_size {config.batch_size} is not a multiple of --micro_batch "
                         f"{config.micro_batch} x {world} processes")
    out = Path(config.out)
    check_run_directory(out, config)
    out.mkdir(parents=True, exist_ok=True)
    run = build(config, rank, world, device)
    if config.stage == "sft" and config.epochs:
        config.steps = math.ceil(config.epochs * len(run.train.examples) / config.batch_size)
    optimizer = make_optimizer(run.module, config)
    params = [p for p in run.module.parameters() if p.requires_grad]
    step = 0
    if config.resume:
        step = resume(out, config, run, optimizer, rank, world, device)
    val_phase, val_batches = None, None

    def next_micro_batches():  # one optimiser step's batches, read after the last checkpoint's
        return [run.train.next(config.micro_batch).to(device) for _ in range(accum)]

    micro = next_micro_batches() if step < config.steps else []  # bad data shows before the progress bar
    if config.overwrite and rank == 0:  # only now that the new run has its model and data
        clear_run(out)
    per_task = config.stage == "base"
    if rank == 0:
        print(f"{config.stage}: {sum(p.numel() for p in params) / 1e6:.2f}M trained parameters, "
              f"{config.steps} steps of {config.batch_size} on {world} x {device}")
    bar = tqdm(total=config.steps, initial=step, desc=config.stage, disable=rank != 0, dynamic_ncols=True)
    started, tokens_seen, last_log = time.time(), 0, None
    try:
        while step < config.steps:
            sums, counts, fired, grad_norm = train_step(run.forward, params, micro, optimizer,
                                                         learning_rate(step, config), config, len(run.tasks),
                                                         run.ddp, per_task)
            step += 1
            tokens_seen += sum(int(b.mask.sum()) for b in micro) * world
            if step % config.log_interval == 0 or step == config.steps:
                last_log = log_step(out, step, config, run.tasks, sums, counts, fired, grad_norm,
                                    tokens_seen / (time.time() - started), world, rank, bar)
            bar.update(1)
            if step % config.eval_interval == 0 or step == config.steps:
                phase = phase_at(step - 1, config)[0]
                if phase != val_phase:
                    source = run.val(phase)
                    val_phase, val_batches = phase, [source.next(config.micro_batch).to(device)
                                                     for _ in range(config.eval_batches)]
                validate(run, val_batches, config, rank, step, out)
            if step % config.ckpt_interval == 0 or step == config.steps:
                write_checkpoint(out, config, run, optimizer, step, rank, world)
            if step < config.steps:
                micro = next_micro_batches()
    finally:
        bar.close()  # an error then starts on a line of its own
    if rank == 0:
        finish(out, config, run, last_log, time.time() - started)
    if world > 1:
        dist.barrier()  # ranks leave together: a gloo process exiting mid-teardown can abort
        dist.destroy_process_group()
    return out / "checkpoint"


def log_step(out, step, config, tasks, sums, counts, fired, grad_norm, tokens_per_s, world, rank, bar):
    """Appends a line to log.jsonl and updates the progress bar (one host sync)."""
    stats = torch.cat([sums, counts, fired.float().view(1)])
    if world > 1:
        dist.all_reduce(stats)
    stats = stats.tolist()
    losses = {name: stats[i] / stats[len(tasks) + i] for i, name in enumerate(tasks) if stats[len(tasks) + i]}
    record = {"step": step, "loss": sum(stats[:len(tasks)]) / max(1.0, sum(stats[len(tasks):2 * len(tasks)])),
              **{f"loss_{k}": v for k, v in losses.items()}, "lr": learning_rate(step - 1, config),
              "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s, "svd_guard_fired": int(stats[-1])}
    if rank == 0:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix({k.removeprefix("loss_"): f"{v:.3f}" for k, v in record.items() if k.startswith("loss_")})
    return record


# What the base stage validates on fresh records besides the files: in-context learning of invented
# tasks, dialogue memory, and closed-book answers about the library's entities never asked about.
BASE_SKILLS = ("fewshot", "dialogue", "closed_book")


def validate(run: Run, val_batches, config: TrainConfig, rank: int, step: int, out: Path) -> None:
    """Generator stages: perplexity per task with the generated adapter and with the base alone.
    Base stage: perplexity, and answer accuracy with and without the context in the prompt.
    Printed, and appended to validation.jsonl beside log.jsonl."""
    if rank != 0:
        return
    if run.base is None:
        ppl = perplexities(run.forward, val_batches, run.tasks)
        records = read_instructions(next(p for p in config.val_data if "instructions" in Path(p).name))
        qa = [r for r in records if r.context and len(run.tokenizer.encode(user_turn(r.prompt, r.context))) < 200][:64]
        em_context = answer_accuracy(run.module, run.tokenizer, qa, with_context=True)
        em_closed = answer_accuracy(run.module, run.tokenizer, qa, with_context=False)
        skills = {kind: answer_accuracy(run.module, run.tokenizer, [Instruction(r["context"], r["prompt"], r["answer"])
                                                                   for r in run.train.records.worlds.validation(kind, 64)],
                                        with_context=True) for kind in BASE_SKILLS}
        tqdm.write(f"step {step}: text ppl {ppl['text']:.2f}, answer ppl {ppl['answer']:.2f}, "
                   f"exact match with context {em_context:.1%}, closed-book {em_closed:.1%}; fresh "
                   + ", ".join(f"{kind} {em:.1%}" for kind, em in skills.items()))
        record = {"ppl": ppl, "exact_match_with_context": em_context, "exact_match_closed_book": em_closed,
                  **{f"exact_match_{kind}": em for kind, em in skills.items()}}
    else:
        plain = lambda b: (run.base(b.tokens.flatten(0, 1), logits_at=b.supervised.flatten(0, 1)), None)
        adapted = perplexities(lambda b: run.module(run.base, b.tokens, b.mask, b.visible, b.supervised),
                               val_batches, run.tasks)
        alone = perplexities(plain, val_batches, run.tasks)
        tqdm.write(f"step {step}: validation perplexity " + ", ".join(
            f"{name} {adapted[name]:.2f} with adapter / {alone[name]:.2f} base alone" for name in adapted))
        record = {"ppl_with_adapter": adapted, "ppl_base_alone": alone}
        if config.curriculum:
            record["phase"] = curriculum_phases(config.curriculum)[phase_at(step - 1, config)[0]][0]
    with open(out / "validation.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **record}) + "\n")


def write_checkpoint(out: Path, config: TrainConfig, run: Run, optimizer, step: int, rank: int, world: int):
    """Rank 0 writes the weights, optimiser state and every rank's RNG and data position."""
    mine = {"data": run.train.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    ranks = [None] * world
    if world > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if rank == 0:
        state = {"step": step, "optimizer": optimizer.state_dict(), "ranks": ranks,
                 "config": recorded_config(cli.flag_values(config), Path.cwd())}
        save_checkpoint(out, run.save_weights, state)
    if world > 1:
        dist.barrier()


def resume(out: Path, config: TrainConfig, run: Run, optimizer, rank: int, world: int, device) -> int:
    """Restores weights, optimiser, RNG and data position; returns the step to continue from."""
    path = find_checkpoint(out)
    state = read_trainer_state(path / "trainer.pt")
    if state["step"] > config.steps:
        raise ValueError(f"--steps {config.steps}: {path} is at step {state['step']} already")
    check_resumed_config(state["config"], config)
    if len(state["ranks"]) != world:
        raise ValueError(f"--resume: {path} was written by {len(state['ranks'])} processes, this run has {world}")
    if config.stage == "base":
        weights = Transformer.from_pretrained(path, device)
    else:
        weights = AdapterGenerator.load(path, run.base.args, device)
    run.module.load_state_dict(weights.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    mine = state["ranks"][rank]
    run.train.load_state_dict(mine["data"])
    torch.set_rng_state(mine["rng"])
    if mine["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda_rng"])
    if rank == 0:
        for log in ("log.jsonl", "validation.jsonl"):
            drop_lines_after(out / log, state["step"])
        print(f"resumed {path} at step {state['step']}")
    return state["step"]


def drop_lines_after(path: Path, step: int) -> None:
    """Forgets what a crashed run logged after its last checkpoint: those steps are redone. A last
    line the crash cut short is dropped too; an unreadable line elsewhere is an error."""
    if not path.exists():
        return
    lines, kept = path.read_text().splitlines(), []
    for number, line in enumerate(lines, 1):
        try:
            logged = json.loads(line)["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if number == len(lines):  # torn by the crash
                break
            raise ValueError(f"{path}:{number}: not a log line of train.py (a JSON object with 'step')") from None
        if logged <= step:
            kept.append(line)
    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))


def finish(out: Path, config: TrainConfig, run: Run, last_log: dict | None, seconds: float) -> None:
    """The final summary, and in the base stage the model written beside its tokenizer."""
    checkpoint = out / "checkpoint"
    print(f"\ndone in {seconds / 60:.1f} min" + (f"; final log line: {json.dumps(last_log)}" if last_log else ""))
    if config.stage == "base":
        run.module.save_pretrained(out)
        if not (out / "tokenizer.model").exists():
            shutil.copy(TINY / "tokenizer.model", out / "tokenizer.model")
        print(f"the base is in {out}/ (config.json, model.safetensors, tokenizer.model)")
        return
    if config.stage == "pretrain" and run.train.stream.skipped:
        print(f"{run.train.stream.skipped} documents shorter than a window ({config.generator.window} tokens) were skipped")
    print(f"generator checkpoint: {checkpoint}/ (generator.safetensors, generator.json)")
    if config.stage == "pretrain":
        print(f"next: python train.py --stage sft --init {checkpoint}   (instruction tuning), or")
    print(f"next: python evaluate.py --task streamingqa --generator {checkpoint}")


if __name__ == "__main__":
    cli.run(main, "train.py")
