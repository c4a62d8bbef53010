"""The training loop both entry scripts share: train.py (the adapter generator, paper §3 and §4)
and data/make_base.py (the tiny base model the generator adapts).

An entry script makes its config (a LoopConfig, from its flags), calls `prepare` (device,
processes, run directory), builds a `Run` (the module it trains, its forward, its data, its
validation, its weights' files) and hands it to `train`: nanoGPT's loop, with gradient
accumulation, DDP through torchrun, periodic validation, atomic checkpoints and exact resumption.

Every run writes, under --out: log.jsonl (a line every --log_interval steps), validation.jsonl
(every --eval_interval steps) and checkpoint/ (the weights, and trainer.pt with the optimiser,
every rank's RNG state and data position, and the config by flag name; replaced atomically). An
--out that holds an earlier run is refused: --resume continues it, --overwrite deletes it.

Read top to bottom: the config, batches and the data both scripts read, loss, optimiser and
schedule, one step, checkpoints and run directories, set-up, the loop.
"""

import contextlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cli
from data.readers import iter_texts
from model import Tokenizer, atomic_write, check_at_least, check_types, setting

ROOT = Path(__file__).resolve().parent
ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-8  # AdamW's, as released
FINAL_LR = 0.1  # the cosine decay ends at this fraction of the peak learning rate
SORT_BLOCK = 64  # RecordBatches sorts this many micro-batches' examples by size at a time
MAX_LOG_PPL = 50.0  # perplexities are capped at e^50 (an untrained model's would overflow)

# -----------------------------------------------------------------------------
# Config


@dataclass
class LoopConfig:
    """The training loop's settings, each a flag of the same name in both entry scripts. The
    defaults are the authors' released recipe for the generator (train.py); data/make_base.py
    has its own recipe."""
    val_data: list[str] = setting([], "validation jsonl / jsonl.gz files or directories (train.py: in the "
                                      "format of --data; data/make_base.py: text files and instruction files)",
                                  path=True)
    out: str = setting("runs/pretrain", "run directory; checkpoint/ and log.jsonl go there", path=True)
    resume: bool = setting(False, "continue the run in --out from its checkpoint, bit for bit")
    overwrite: bool = setting(False, "start afresh in an --out that holds an earlier run (its checkpoint or "
                                     "logs), deleting its checkpoint/, log.jsonl and validation.jsonl; without "
                                     "--resume or --overwrite such an --out is refused")
    lr: float = setting(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on norms)")
    warmup: int = setting(100, "linear warm-up steps, then cosine decay to lr / 10")
    steps: int = setting(15000, "optimiser steps")  # ~1B tokens at 8 x 8192 per step, the released budget
    batch_size: int = setting(8, "global batch in sequences (pretrain, base) or records (sft)")
    micro_batch: int = setting(1, "sequences per device per forward (batch_size / (micro_batch x GPUs) "
                                  "gradient-accumulation steps)")
    grad_clip: float = setting(1.0, "clip the gradient norm to this")
    seed: int = setting(0, "random seed")
    eval_interval: int = setting(500, "validate every N steps")
    eval_batches: int = setting(20, "validation micro-batches")
    log_interval: int = setting(10, "append to log.jsonl every N steps")
    ckpt_interval: int = setting(1000, "checkpoint every N steps")
    device: str = setting("", cli.DEVICE_HELP)

    def __post_init__(self):
        """Checks every value, naming its flag: a run configured in code is checked like one
        from the command line, before anything is loaded."""
        check_types(self, "--")
        check_at_least(self, 1, ("steps", "batch_size", "micro_batch", "eval_interval", "eval_batches",
                                 "log_interval", "ckpt_interval"), "--")
        check_at_least(self, 0, ("lr", "weight_decay", "warmup"), "--")
        if self.grad_clip <= 0:
            raise ValueError(f"--grad_clip: expected a positive gradient norm, got {self.grad_clip}")
        if self.batch_size % self.micro_batch:
            raise ValueError(f"--batch_size {self.batch_size} is not a multiple of --micro_batch {self.micro_batch}")
        if not self.out:
            raise ValueError("--out is empty: expected the run directory")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out, --overwrite deletes it: give one of them")

    def phases(self) -> list[int]:
        """The lengths of the run's phases, each with its own warm-up and decay: here one phase
        of all the steps (train.py's curriculum has several)."""
        return [self.steps]

    def peak_lr(self, phase: int) -> float:
        """The peak learning rate of a phase: --lr in every phase here."""
        return self.lr


# -----------------------------------------------------------------------------
# Batches, and the data both scripts read: packed text, shuffled examples


@dataclass
class Batch:
    """Windows run as independent sequences. tokens, mask, targets: (N, W, w); visible: (W, W);
    task: which loss each target counts in (an index into the run's task names), broadcastable
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


class BatchSource(Protocol):
    """Micro-batches, and the position a checkpoint stores to resume them exactly."""

    def next(self, n: int) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def next_token_targets(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """targets[..., t] = tokens[..., t + 1] within each window, -100 where there is none."""
    targets = torch.full_like(tokens, -100)
    targets[..., :-1] = tokens[..., 1:].masked_fill(~mask[..., 1:], -100)
    return targets


class TextStream:
    """Documents (BOS + text + EOS) from jsonl files, packed into sequences of `length` tokens.

    Rank r of `world` takes records r, r + world, ...; documents shorter than `min_tokens` are
    skipped and counted. The stream restarts at the end of the data (a new epoch); its position
    is a small state (records read, leftover tokens) that a checkpoint stores.
    """

    def __init__(self, paths, tokenizer: Tokenizer, length: int, min_tokens: int, *, rank=0, world=1):
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


class RecordBatches:
    """Micro-batches of examples, reshuffled every epoch; rank r takes every world-th.

    With `size` (example -> sortable size), each block of SORT_BLOCK micro-batches is sorted by
    size, cut into micro-batches and those are shuffled: batches of similar examples pad less (the
    bundled SFT examples span 1 to 12 context windows; in micro-batches of 16 this cuts the
    padded share of tokens from 62% to 17%). Without `collate`, examples are taken one by one."""

    def __init__(self, examples: list, seed: int, collate: Callable[[list], Batch] | None, *, rank=0, world=1,
                 size: Callable | None = None, micro_batch=1):
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
        n, block = self.micro_batch, SORT_BLOCK * self.micro_batch
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


def combine(sums: torch.Tensor, counts: torch.Tensor, per_task: bool) -> torch.Tensor:
    """The loss: the mean over all supervised tokens of all tasks (the generator's, paper §3), or
    the sum of each task's mean (the tiny base's, so that short answers weigh as much as long
    texts)."""
    if per_task:
        return (sums / counts.clamp_min(1)).sum()
    return sums.sum() / counts.sum().clamp_min(1)


def make_optimizer(module: nn.Module, config: LoopConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices, not on norm weights."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "norm" not in n], "weight_decay": config.weight_decay},
              {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def phase_at(step: int, config: LoopConfig) -> tuple[int, int, int]:
    """The phase (config.phases()) that optimiser step `step` (0-based) belongs to: (index, first
    step, length); the last phase goes on past its end."""
    phases, start = config.phases(), 0
    for i, steps in enumerate(phases):
        if step < start + steps or i == len(phases) - 1:
            return i, start, steps
        start += steps


def accumulation(config: LoopConfig, world: int) -> int:
    """Micro-batches per optimiser step on each of `world` processes (gradient accumulation)."""
    return config.batch_size // (config.micro_batch * world)


def micro_batch_phase(drawn: int, config: LoopConfig, world: int) -> int:
    """The phase of the micro-batch a rank draws after `drawn` others: they fill the steps in turn."""
    return phase_at(drawn // accumulation(config, world), config)[0]


def learning_rate(step: int, config: LoopConfig) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR of the peak; anew in each phase."""
    phase, start, length = phase_at(step, config)
    step, peak = step - start, config.peak_lr(phase)
    if step < config.warmup:
        return peak * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, length - config.warmup))
    return peak * (FINAL_LR + (1 - FINAL_LR) / 2 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# One optimiser step, and validation perplexity


Forward = Callable[[Batch], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class StepStats:
    """One optimiser step's losses, still on the device: summed cross-entropy and token counts
    per task (n_tasks,), how often the SVD guard fired, the gradient norm before clipping."""
    sums: torch.Tensor
    counts: torch.Tensor
    fired: torch.Tensor
    grad_norm: torch.Tensor


def train_step(forward: Forward, params: list[nn.Parameter], micro_batches: list[Batch],
               optimizer: torch.optim.Optimizer, *, lr: float, grad_clip: float, n_tasks: int,
               per_task: bool = False, ddp: DDP | None = None) -> StepStats:
    """One optimiser step over micro-batches (gradient accumulation).

    Args:
        forward: batch -> (logits (n, V) at the batch's n supervised positions, guard count).
        params: the trained parameters (for clipping).
        n_tasks: how many task indices batches carry (losses are reported per task).
        per_task: the loss combine() makes of the tasks' losses.
        ddp: the DDP module forward runs: gradients are all-reduced on the last micro-batch only.
    Returns:
        the step's StepStats (tensors, no host sync).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = counts = fired = 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        no_sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
        with no_sync, cli.autocast(batch.tokens.device):
            logits, f = forward(batch)
            s, c = task_losses(logits, batch, n_tasks)
            (combine(s, c, per_task) / len(micro_batches)).backward()
        sums, counts, fired = sums + s.detach(), counts + c, fired + f
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(sums, counts, fired, grad_norm)


@torch.no_grad()
def perplexities(forward: Forward, batches: list[Batch], names) -> dict:
    """Perplexity per task over validation batches."""
    sums = counts = 0
    for batch in batches:
        with cli.autocast(batch.tokens.device):
            s, c = task_losses(forward(batch)[0], batch, len(names))
        sums, counts = sums + s, counts + c
    return {name: math.exp(min(MAX_LOG_PPL, float(s / c))) for name, s, c in zip(names, sums, counts) if c > 0}


# -----------------------------------------------------------------------------
# Checkpoints (a directory replaced atomically) and run directories


def save_checkpoint(out: Path, save_weights: Callable[[Path], None], trainer_state: dict) -> None:
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
        raise ValueError(f"{file}: not a trainer state written by this training loop (missing {missing})")
    return state


RUN_FILES = ("checkpoint", "checkpoint.old", "log.jsonl", "validation.jsonl")


def check_run_directory(out: Path, config: LoopConfig) -> None:
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
            raise ValueError(f"{path}:{number}: not a log line of a training run (a JSON object with 'step')") from None
        if logged <= step:
            kept.append(line)
    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))


# Settings a resumed run may change; the others must be those of the checkpoint. --out and
# train.py's --init are not compared: the run resumes from the --out it is given, and --init is
# read at the start only.
RESUMABLE_CHANGES = {"resume", "overwrite", "out", "init", "steps", "eval_interval", "eval_batches",
                     "log_interval", "ckpt_interval", "device"}


def portable(path: str, start: Path) -> str:
    """A path as a checkpoint records it: relative to the repository when inside it, else absolute
    (a relative path being read from `start`). A moved checkout or run directory still resumes."""
    if not path:
        return path
    full = (start / path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(full)


def recorded_config(values: dict, config: type, start: Path) -> dict:
    """What a checkpoint records of a config of class `config`: its settings by flag name
    (cli.flag_values), the paths among them made portable (relative ones read from `start`)."""
    paths = {f.name for f in cli.settings(config) if f.metadata["path"]}
    made_portable = lambda v: [portable(p, start) for p in v] if isinstance(v, list) else portable(v, start)
    return {k: made_portable(v) if k in paths else v for k, v in values.items()}


def check_resumed_config(saved: dict, config: LoopConfig) -> None:
    """A resumed run must keep its hyperparameters; changing the step budget only warns. The
    checkpoint's paths are portable (relative to the repository); the current ones are made so.
    A setting the checkpoint does not record (added since it was written) had its default."""
    defaults = recorded_config(cli.flag_values(type(config)()), type(config), ROOT)
    saved = defaults | recorded_config(saved, type(config), ROOT)
    current = recorded_config(cli.flag_values(config), type(config), Path.cwd())
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        raise ValueError("--resume with different hyperparameters: " + ", ".join(
            f"--{k} was {saved.get(k)!r}, now {current[k]!r}" for k in changed))
    if saved["steps"] != config.steps:
        print(f"warning: --steps changed from {saved['steps']} to {config.steps}: "
              "the learning-rate schedule changes from here on", file=sys.stderr)


# -----------------------------------------------------------------------------
# Set-up


@dataclass
class Process:
    """This process's rank among the `world` processes of a torchrun job (rank 0 of 1 without
    one), and its device."""
    rank: int
    world: int
    device: torch.device


def prepare(config: LoopConfig) -> Process:
    """What comes before anything is loaded: the device and the process group (from torchrun's
    environment when present), the global batch split among the processes, and --out checked to
    take this run (check_run_directory) and made."""
    device = cli.pick_device(config.device)
    rank, world = 0, 1
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if config.batch_size % (config.micro_batch * world):
        raise ValueError(f"--batch_size {config.batch_size} is not a multiple of --micro_batch "
                         f"{config.micro_batch} x {world} processes")
    out = Path(config.out)
    check_run_directory(out, config)
    out.mkdir(parents=True, exist_ok=True)
    return Process(rank, world, device)


# -----------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """What an entry script trains, and how: the loop's side of a stage."""
    name: str  # the stage, as the progress bar shows it
    module: nn.Module  # the trained module, unwrapped (the loop wraps it in DDP when distributed)
    # (module or its DDP wrapper, batch) -> (logits (n, V) at the n supervised positions, guard count)
    forward: Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
    train: BatchSource
    val: Callable[[int], BatchSource]  # phase -> its validation batches
    validate: Callable[[list[Batch], int], dict]  # (validation batches, step) -> record; prints it
    save_weights: Callable[[Path], None]  # writes the module's weights into a directory
    load_weights: Callable[[Path], None]  # reads them back into the module (--resume)
    tasks: tuple[str, ...]  # the loss names, by task index
    per_task: bool = False  # combine(): the loss is the sum of each task's mean


def train(config: LoopConfig, run: Run, proc: Process) -> None:
    """Trains run.module for config.steps optimiser steps, from the checkpoint in --out with
    --resume: nanoGPT's loop, micro-batches read ahead of the step that uses them; logs, validates
    and checkpoints on rank 0 at their intervals and at the last step. Ends the process group."""
    out, device, world = Path(config.out), proc.device, proc.world
    accum = accumulation(config, world)
    ddp = DDP(run.module, device_ids=[device] if device.type == "cuda" else None) if world > 1 else None

    def forward(batch: Batch):
        return run.forward(ddp or run.module, batch)

    optimizer = make_optimizer(run.module, config)
    params = [p for p in run.module.parameters() if p.requires_grad]
    step = resume(config, run, optimizer, proc) if config.resume else 0
    val_phase, val_batches = None, None

    def next_micro_batches():  # one optimiser step's batches, read after the last checkpoint's
        return [run.train.next(config.micro_batch).to(device) for _ in range(accum)]

    micro = next_micro_batches() if step < config.steps else []  # bad data shows before the progress bar
    if config.overwrite and proc.rank == 0:  # only now that the new run has its model and data
        clear_run(out)
    if proc.rank == 0:
        print(f"{run.name}: {sum(p.numel() for p in params) / 1e6:.2f}M trained parameters, "
              f"{config.steps} steps of {config.batch_size} on {world} x {device}")
    bar = tqdm(total=config.steps, initial=step, desc=run.name, disable=proc.rank != 0, dynamic_ncols=True)
    started, tokens_seen, last_log = time.time(), 0, None
    try:
        while step < config.steps:
            lr = learning_rate(step, config)
            stats = train_step(forward, params, micro, optimizer, lr=lr, grad_clip=config.grad_clip,
                               n_tasks=len(run.tasks), per_task=run.per_task, ddp=ddp)
            step += 1
            tokens_seen += sum(int(b.mask.sum()) for b in micro) * world
            if step % config.log_interval == 0 or step == config.steps:
                last_log = log_step(out, step, stats, run.tasks, lr=lr, proc=proc, bar=bar,
                                    tokens_per_s=tokens_seen / (time.time() - started))
            bar.update(1)
            if step % config.eval_interval == 0 or step == config.steps:
                phase = phase_at(step - 1, config)[0]
                if phase != val_phase:
                    source = run.val(phase)
                    val_phase, val_batches = phase, [source.next(config.micro_batch).to(device)
                                                     for _ in range(config.eval_batches)]
                if proc.rank == 0:
                    with open(out / "validation.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **run.validate(val_batches, step)}) + "\n")
            if step % config.ckpt_interval == 0 or step == config.steps:
                write_checkpoint(config, run, optimizer, step, proc)
            if step < config.steps:
                micro = next_micro_batches()
    finally:
        bar.close()  # an error then starts on a line of its own
    if proc.rank == 0:
        minutes = (time.time() - started) / 60
        print(f"\ndone in {minutes:.1f} min" + (f"; final log line: {json.dumps(last_log)}" if last_log else ""))
    if world > 1:
        dist.barrier()  # ranks leave together: a gloo process exiting mid-teardown can abort
        dist.destroy_process_group()


def log_step(out: Path, step: int, stats: StepStats, tasks: tuple[str, ...], *, lr: float,
             tokens_per_s: float, proc: Process, bar: tqdm) -> dict:
    """Appends a line to log.jsonl and updates the progress bar (one host sync)."""
    n = len(tasks)
    totals = torch.cat([stats.sums, stats.counts, stats.fired.float().view(1)])
    if proc.world > 1:
        dist.all_reduce(totals)
    totals = totals.tolist()
    losses = {name: totals[i] / totals[n + i] for i, name in enumerate(tasks) if totals[n + i]}
    record = {"step": step, "loss": sum(totals[:n]) / max(1.0, sum(totals[n:2 * n])),
              **{f"loss_{k}": v for k, v in losses.items()}, "lr": lr, "grad_norm": float(stats.grad_norm),
              "tokens_per_s": tokens_per_s, "svd_guard_fired": int(totals[-1])}
    if proc.rank == 0:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix({k.removeprefix("loss_"): f"{v:.3f}" for k, v in record.items() if k.startswith("loss_")})
    return record


def write_checkpoint(config: LoopConfig, run: Run, optimizer: torch.optim.Optimizer, step: int,
                     proc: Process) -> None:
    """Rank 0 writes the weights, optimiser state and every rank's RNG and data position."""
    mine = {"data": run.train.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    ranks = [None] * proc.world
    if proc.world > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if proc.rank == 0:
        state = {"step": step, "optimizer": optimizer.state_dict(), "ranks": ranks,
                 "config": recorded_config(cli.flag_values(config), type(config), Path.cwd())}
        save_checkpoint(Path(config.out), run.save_weights, state)
    if proc.world > 1:
        dist.barrier()


def resume(config: LoopConfig, run: Run, optimizer: torch.optim.Optimizer, proc: Process) -> int:
    """Restores weights, optimiser, RNG and data position; returns the step to continue from."""
    out = Path(config.out)
    path = find_checkpoint(out)
    state = read_trainer_state(path / "trainer.pt")
    if state["step"] > config.steps:
        raise ValueError(f"--steps {config.steps}: {path} is at step {state['step']} already")
    check_resumed_config(state["config"], config)
    if len(state["ranks"]) != proc.world:
        raise ValueError(f"--resume: {path} was written by {len(state['ranks'])} processes, this run has "
                         f"{proc.world}")
    run.load_weights(path)
    optimizer.load_state_dict(state["optimizer"])
    mine = state["ranks"][proc.rank]
    run.train.load_state_dict(mine["data"])
    torch.set_rng_state(mine["rng"])
    if mine["cuda_rng"] is not None and proc.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda_rng"])
    if proc.rank == 0:
        for log in ("log.jsonl", "validation.jsonl"):
            drop_lines_after(out / log, state["step"])
        print(f"resumed {path} at step {state['step']}")
    return state["step"]
