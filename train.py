"""Trains GenerativeAdapter's adapter generator on a frozen base LM: self-supervised pretraining
(paper §3) and instruction tuning (paper §4). METHOD.md states the computation, its shapes and
letters; training.py holds the loop (also that of data/make_base.py, which trains the tiny base).

    python train.py                                    # the embedded default: tiny base, bundled
                                                       # world, both tasks, ~10 minutes on a CPU
    python train.py --stage sft --init runs/pretrain/checkpoint   # instruction tuning (paper §4)
    torchrun --nproc_per_node 8 train.py --base /models/Mistral-7B-Instruct-v0.2 \\
        --data /data/slimpajama --out runs/mistral      # the released recipe, 8 GPUs

Stages:
  pretrain  self-supervised completion + reconstruction (paper §3) on packed text windows;
  sft       (context, prompt, answer) records: the context as windows, the chat turn as the final
            window, loss on the answer only (paper §4).
The tiny base of the embedded default (data/tiny/) is trained by its own script,
python data/make_base.py.

Defaults are the authors' released configuration for a full-size base; without --base, the
embedded tiny preset (printed by --help) replaces them. Every run writes, under --out:
checkpoint/ (generator.safetensors + generator.json, trainer.pt with optimiser, RNG and data
position; replaced atomically) and log.jsonl. An --out that holds an earlier run is refused:
--resume continues that run, --overwrite deletes it and starts afresh.
"""

import argparse
import json
import math
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import cli
from data.make_world import Ladder
from data.readers import Instruction, read_instructions
from generator import TASKS, AdapterGenerator, GeneratorConfig, pretraining_layout, split_windows
from model import Tokenizer, Transformer, chat_example, check_at_least, context_ids, load, setting
from training import (ROOT, Batch, LoopConfig, Process, RecordBatches, Run, TextStream, find_checkpoint,
                      micro_batch_phase, next_token_targets, perplexities, phase_at, prepare, train)

TINY = ROOT / "data" / "tiny"
WORLD = ROOT / "data" / "world"
STAGES = ("pretrain", "sft")
VAL_SEED = 12345  # the validation texts' reconstruction spans: the same draws at every validation

# -----------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig(LoopConfig):
    """train.py's settings, each a flag of the same name: these, the generator's (GeneratorConfig,
    paper §3) and the training loop's (LoopConfig). The defaults are the authors' released
    configuration for a full-size base."""
    stage: str = setting("pretrain", "pretrain (self-supervised, paper §3) or sft (instruction tuning, paper "
                                     "§4); the tiny base is trained by python data/make_base.py")
    base: str = setting(str(TINY), "base model directory: Hugging Face (config.json + safetensors) or "
                                   "Mistral consolidated", path=True)
    data: list[str] = setting([], "training jsonl / jsonl.gz files or directories (pretrain: records with "
                                  "'text'; sft: records with 'context', 'prompt', 'answer')", path=True)
    init: str = setting("", "sft: directory of the pretrained generator to start from (not read by --resume)",
                        path=True)
    curriculum: list[str] = setting([], "sft: phases RUNG:STEPS, comma separated, climbed in order: each trains "
                                        "on records of one rung of data/make_world.py's Ladder "
                                        f"({', '.join(Ladder.RUNGS)}) about the bundled world's train split "
                                        "(tasks: invented worlds), validates on its validation split, and "
                                        "restarts the learning-rate schedule; a share --replay of a phase's "
                                        "records replay the rungs below it and those of the earlier phases; the "
                                        "steps add up to --steps. Giving --data without --curriculum trains on "
                                        "--data instead")
    replay: float = setting(Ladder.REPLAY, "sft --curriculum: the share of each phase's records drawn, in equal parts, "
                                  "from the rungs below it on the ladder and those of the earlier phases")
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)  # flags --k, --d_r, ...
    windows: int = setting(8, "context windows C per pretraining text")
    tasks: list[str] = setting(list(TASKS), "self-supervised tasks, comma separated: completion,reconstruction "
                                            "(either alone for the paper's ablation)")
    epochs: int = setting(0, "sft: passes over the records, instead of --steps (0: use --steps)")

    def __post_init__(self):
        """The stage, the loop's settings (LoopConfig), then train.py's, each error naming its flag
        (the generator's settings are checked by GeneratorConfig)."""
        if self.stage == "base":
            raise ValueError("--stage base: the tiny base is trained by its own script, python data/make_base.py")
        if self.stage not in STAGES:
            raise ValueError(f"--stage {self.stage}: expected one of {list(STAGES)}")
        super().__post_init__()
        check_at_least(self, 1, ("windows",), "--")
        check_at_least(self, 0, ("epochs",), "--")
        if not 0 <= self.replay <= 1:
            raise ValueError(f"--replay {self.replay}: expected a share between 0 and 1")
        if not self.tasks or not set(self.tasks) <= set(TASKS) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks {','.join(self.tasks)}: expected completion and/or reconstruction")
        if self.stage == "sft" and not self.init and not self.resume:
            raise ValueError("--stage sft needs --init, the pretrained generator's directory")
        total = curriculum_steps(self.curriculum)
        if self.curriculum and (self.steps != total or self.epochs):
            raise ValueError(f"--steps {self.steps}: the --curriculum phases add up to {total} steps "
                             "(and set the run's length without --epochs)")

    def phases(self) -> list[int]:
        """The curriculum's phases' lengths, or one phase of all the steps without a curriculum."""
        return [steps for _, steps in curriculum_phases(self.curriculum)] or [self.steps]


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
}
# The released instruction tuning of a full-size base (paper §4, and the authors' released code).
SFT_RELEASED = dict(lr=5e-5, epochs=2, batch_size=32)

# Flags a stage has no use for, and why: giving one is an error rather than silently ignored.
UNUSED_FLAGS = {
    "pretrain": (("init", "epochs", "curriculum", "replay"), "it is for --stage sft"),
    "sft": ((*(f.name for f in fields(GeneratorConfig)), "windows", "tasks"),
            "the generator's settings come from --init, and --windows and --tasks are pretraining's"),
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
    if "replay" in given and not merged["curriculum"]:
        raise ValueError("--replay is for --curriculum phases (records from --data are not replayed)")
    if merged["curriculum"]:
        if given.get("epochs"):
            raise ValueError("--epochs: a --curriculum sets the run's length by its phases' steps")
        merged |= {"steps": given.get("steps", curriculum_steps(merged["curriculum"])), "epochs": 0}
    config = cli.from_flags(TrainConfig, merged)
    if "base" in given and not config.data and not config.curriculum:
        raise ValueError("--data (or, for sft, --curriculum) is required with --base "
                         "(the bundled data is for the tiny base)")
    if "base" in given and not config.val_data and not config.curriculum:
        raise ValueError("--val_data is required with --base and --data (validation runs at least at the last "
                         "step; the bundled validation files are for the tiny base)")
    return config


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


# -----------------------------------------------------------------------------
# Data: the self-supervised tasks' windows, instruction records


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


class CurriculumBatches:
    """The sft micro-batches of a --curriculum. When phase i starts, it makes steps_i x batch_size
    records of its Ladder rung (record j a function of the seed and j; the replayed share also
    draws from the rungs of the earlier phases) and serves them through RecordBatches; the state
    is the number of micro-batches drawn and that phase's position."""

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer, w: int, rank=0, world=1):
        self.config, self.tokenizer, self.w, self.rank, self.world = config, tokenizer, w, rank, world
        self.ladder, self.drawn, self.phase, self.batches = Ladder(replay=config.replay), 0, None, None

    def examples(self, phase: int, split: str, n: int) -> list:
        """SFT examples of the first n records of a phase's rung that fit (split: train or validation)."""
        rungs = [rung for rung, _ in curriculum_phases(self.config.curriculum)]
        climbed = tuple(rungs[:phase])  # replayed too, whatever their place on the ladder
        records = (Instruction(**self.ladder.record(rungs[phase], split, f"{self.config.seed}/{j}", climbed))
                   for j in range(n))
        return [e for e in (sft_example(self.tokenizer, r, self.w) for r in records) if e is not None]

    def _enter(self, phase: int) -> None:
        steps = curriculum_phases(self.config.curriculum)[phase][1]
        examples = self.examples(phase, "train", steps * self.config.batch_size)
        self.phase, self.batches = phase, RecordBatches(examples, self.config.seed, sft_batch, rank=self.rank,
                                                        world=self.world, size=sft_size,
                                                        micro_batch=self.config.micro_batch)

    def next(self, n: int) -> Batch:
        phase = micro_batch_phase(self.drawn, self.config, self.world)
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


# -----------------------------------------------------------------------------
# The stages: what they train, how they validate


def build(config: TrainConfig, proc: Process) -> Run:
    """The generator on its frozen base, and its data: packed texts with both tasks' windows
    (pretrain, paper §3), or instruction records from --data or up the --curriculum (sft, §4)."""
    device = proc.device
    base, tokenizer = load(config.base, device, cli.compute_dtype(device))
    base.checkpointing = device.type == "cuda"  # recompute the base's layers in backward
    torch.manual_seed(config.seed)  # the generator's initialisation and the randomised SVDs' draws
    if config.stage == "pretrain":
        generator = AdapterGenerator(base.args, config.generator).to(device)
        w = config.generator.window
        length = config.windows * w
        train_batches = PretrainBatches(TextStream(config.data, tokenizer, length, w, rank=proc.rank, world=proc.world),
                                        config, config.seed + proc.rank)
        # validation measures both tasks whatever --tasks trains (the paper's Table 2 ablation)
        val = lambda phase: PretrainBatches(TextStream(config.val_data, tokenizer, length, w),
                                            config, VAL_SEED, TASKS)
    else:  # resuming, the checkpoint's generator (its weights are restored again by resume())
        start = find_checkpoint(Path(config.out)) if config.resume else config.init
        generator = AdapterGenerator.load(start, base.args, device)
        w = generator.config.window
        if config.curriculum:
            train_batches = CurriculumBatches(config, tokenizer, w, proc.rank, proc.world)
            n_val = config.eval_batches * config.micro_batch
            val = lambda phase: RecordBatches(train_batches.examples(phase, "validation", n_val), 0, sft_batch)
        else:
            examples, skipped = load_sft_examples(config.data, tokenizer, w)
            if skipped and proc.rank == 0:
                print(f"sft: skipped {skipped} records whose prompt and answer exceed one window")
            train_batches = RecordBatches(examples, config.seed, sft_batch, rank=proc.rank, world=proc.world,
                                          size=sft_size, micro_batch=config.micro_batch)
            val = lambda phase: RecordBatches(load_sft_examples(config.val_data, tokenizer, w)[0], 0, sft_batch)
    tasks = TASKS if config.stage == "pretrain" else ("answer",)

    def load_weights(path: Path) -> None:
        generator.load_state_dict(AdapterGenerator.load(path, base.args, device).state_dict())

    return Run(name=config.stage, module=generator, forward=partial(adapted_forward, base=base),
               train=train_batches, val=val, save_weights=generator.save, load_weights=load_weights,
               validate=partial(validate, generator=generator, base=base, tasks=tasks, config=config), tasks=tasks)


def adapted_forward(generator: torch.nn.Module, batch: Batch, *, base: Transformer):
    """The batch's windows through the base with the generated adapters (the generator, or its DDP
    wrapper): logits at the supervised positions, and how often the SVD guard fired."""
    return generator(base, batch.tokens, batch.mask, batch.visible, batch.supervised)


def validate(batches: list[Batch], step: int, *, generator: AdapterGenerator, base: Transformer,
             tasks: tuple[str, ...], config: TrainConfig) -> dict:
    """Perplexity per task with the generated adapter and with the base alone, printed; returns
    them (and a curriculum's phase) for validation.jsonl."""
    plain = lambda b: (base(b.tokens.flatten(0, 1), logits_at=b.supervised.flatten(0, 1)), None)
    adapted = perplexities(lambda b: adapted_forward(generator, b, base=base), batches, tasks)
    alone = perplexities(plain, batches, tasks)
    tqdm.write(f"step {step}: validation perplexity " + ", ".join(
        f"{name} {adapted[name]:.2f} with adapter / {alone[name]:.2f} base alone" for name in adapted))
    record = {"ppl_with_adapter": adapted, "ppl_base_alone": alone}
    if config.curriculum:
        record["phase"] = curriculum_phases(config.curriculum)[phase_at(step - 1, config)[0]][0]
    return record


def finish(config: TrainConfig, run: Run) -> None:
    """Where the generator is, and the next command."""
    checkpoint = Path(config.out) / "checkpoint"
    if config.stage == "pretrain" and run.train.stream.skipped:
        print(f"{run.train.stream.skipped} documents shorter than a window ({config.generator.window} tokens) "
              "were skipped")
    print(f"generator checkpoint: {checkpoint}/ (generator.safetensors, generator.json)")
    if config.stage == "pretrain":
        print(f"next: python train.py --stage sft --init {checkpoint}   (instruction tuning), or")
    print(f"next: python evaluate.py --task streamingqa --generator {checkpoint}")


def main(argv=None) -> Path:
    """Trains the generator the flags describe; returns its checkpoint directory."""
    config = parse_args(argv)
    proc = prepare(config)
    run = build(config, proc)
    if config.stage == "sft" and config.epochs:
        config.steps = math.ceil(config.epochs * len(run.train.examples) / config.batch_size)
    train(config, run, proc)
    if proc.rank == 0:
        finish(config, run)
    return Path(config.out) / "checkpoint"


if __name__ == "__main__":
    cli.run(main, "train.py")
