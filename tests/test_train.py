"""train.py and the loop it shares with data/make_base.py (training.py): task layout, losses,
resumption, checkpoints, DDP, bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import cli
import train
import training
from conftest import random_model, tiny_args
from data.readers import Instruction
from generator import TASKS, AdapterGenerator, pretraining_layout
from model import Tokenizer, Transformer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tiny" / "tokenizer.model"
WORDS = "the archive of Tesk keeps records of bakers welders and potters who worked for Ostrum Mills".split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small random base with the bundled tokenizer, and a few text files."""
    root = tmp_path_factory.mktemp("world")
    random_model(tiny_args(vocab_size=4096, max_seq_len=256)).save_pretrained(root / "base")
    shutil.copy(TOKENIZER, root / "base" / "tokenizer.model")
    rng = torch.Generator().manual_seed(0)
    lines = []
    for i in range(40):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (60,), generator=rng)]
        lines.append(json.dumps({"text": " ".join(words), "meta": {"redpajama_set_name": "test"}}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "val.jsonl").write_text("\n".join(lines[:4]) + "\n")
    return root


def args(world: Path, out: Path, *extra) -> list[str]:
    return ["--base", str(world / "base"), "--data", str(world / "train.jsonl"),
            "--val_data", str(world / "val.jsonl"), "--out", str(out), "--window", "16",
            "--windows", "3", "--d_r", "16", "--r", "16", "--k", "4", "--alpha", "4",
            "--lr", "3e-3", "--warmup", "2", "--steps", "6", "--batch_size", "4",
            "--micro_batch", "2", "--eval_interval", "100", "--eval_batches", "1",
            "--log_interval", "1", "--ckpt_interval", "3", "--device", "cpu", *extra]


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# -----------------------------------------------------------------------------
# The self-supervised tasks' windows (paper §3)


def test_task_layout_by_hand():
    visible, task = pretraining_layout(3, TASKS)
    assert visible.int().tolist() == [
        [0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],  # reconstruction 1 sees window 1
        [1, 1, 0, 0, 0, 0],  # reconstruction 2 sees windows 1..2
        [1, 1, 1, 0, 0, 0]]
    assert task.tolist() == [0, 0, 0, 1, 1, 1]
    sequence = list(range(100, 112))  # C = 3 windows of w = 4
    rng = torch.Generator().manual_seed(0)
    tokens, mask, targets = train.pretraining_example(sequence, 3, 4, TASKS, rng)
    assert tokens[:3].flatten().tolist() == sequence
    assert targets[0].tolist() == [101, 102, 103, -100]
    for i in range(1, 4):  # span of window i: inside the first i * w tokens, at most w long
        span = tokens[2 + i][mask[2 + i]].tolist()
        assert 1 <= len(span) <= 4 and span == list(range(span[0], span[0] + len(span)))
        assert 100 <= span[0] and span[-1] < 100 + 4 * i
        assert targets[2 + i].tolist() == span[1:] + [-100] * (5 - len(span))
    assert not mask[3:][~mask[3:]].any()


def test_span_starts_cover_the_text_seen_so_far():
    rng = torch.Generator().manual_seed(0)
    starts = {i: set() for i in range(1, 4)}
    for _ in range(300):
        tokens, mask, _ = train.pretraining_example(list(range(12)), 3, 4, TASKS, rng)
        for i in range(1, 4):
            starts[i].add(int(tokens[2 + i, 0]))
    assert starts == {i: set(range(4 * i)) for i in range(1, 4)}


def test_ablation_switches():
    sequence = list(range(100, 112))
    both = train.pretraining_example(sequence, 3, 4, TASKS, torch.Generator().manual_seed(0))
    completion = train.pretraining_example(sequence, 3, 4, ["completion"], torch.Generator().manual_seed(0))
    reconstruction = train.pretraining_example(sequence, 3, 4, ["reconstruction"], torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b[:3]) for a, b in zip(completion, both))  # no reconstruction windows
    assert torch.equal(pretraining_layout(3, ["completion"])[0], torch.ones(3, 3).tril(-1).bool())
    assert torch.equal(reconstruction[0], both[0]) and torch.equal(reconstruction[2][3:], both[2][3:])
    assert (reconstruction[2][:3] == -100).all()  # completion windows give context, no loss
    config = train.parse_args(["--norm", "frobenius"])
    assert config.generator.norm == "frobenius"
    assert train.parse_args([]).generator.norm == "svd"


# -----------------------------------------------------------------------------
# Instruction tuning: loss on the answer only (paper §4)


def test_sft_targets_cover_only_the_answer():
    tok = Tokenizer(TOKENIZER, template="mistral")
    record = Instruction(context="Maro Velin was born in Tesk. " * 20, prompt="Where was Maro Velin born?",
                         answer="Tesk")
    windows, ids, targets = train.sft_example(tok, record, 64)
    context = tok.encode_chat([{"role": "user", "content": record.context}])
    assert sum(windows, []) == context and len(windows) == -(-len(context) // 64)
    supervised = [t for t in targets if t != -100]
    assert supervised == tok.encode("Tesk", bos=False, eos=True)
    first = targets.index(supervised[0])
    assert ids[first + 1:first + 1 + len(supervised)] == supervised  # target t predicts token t + 1
    batch = train.sft_batch([(windows, ids, targets), ([windows[0]], ids, targets)], pad_id=0)
    assert (batch.targets[:, :-1] == -100).all()  # context windows carry no loss
    assert batch.mask[1, 1:-1].sum() == 0  # empty windows between context and final window
    assert batch.visible.int().tolist() == torch.ones(len(windows) + 1, len(windows) + 1).tril(-1).int().tolist()


# -----------------------------------------------------------------------------
# Training runs


def test_sft_batches_bucket_by_size_and_resume():
    # examples of 1..5 windows of 1..6 tokens: with bucketing an epoch is still a permutation,
    # pads less than plain shuffling, and resumes from (epoch, position) exactly
    examples = [([[7] * (i % 6 + 1)] * (i % 5 + 1), [1, 2], [-100, 3]) for i in range(96)]
    cells = {}
    for size in (None, train.sft_size):
        source = training.RecordBatches(examples, 3, train.sft_batch, size=size, micro_batch=4)
        epoch = [source.take(4) for _ in range(24)]
        assert sorted(id(e) for batch in epoch for e in batch) == sorted(map(id, examples))
        cells[size] = sum(train.sft_batch(batch).mask.numel() for batch in epoch)
    assert cells[train.sft_size] < 0.7 * cells[None]
    source.take(10)
    resumed = training.RecordBatches(examples, 3, train.sft_batch, size=train.sft_size, micro_batch=4)
    resumed.load_state_dict(source.state_dict())
    assert resumed.take(30) == source.take(30)
    with pytest.raises(ValueError, match="0 examples cannot be shared among 1 processes"):
        training.RecordBatches([], 0, train.sft_batch)  # rather than loop forever looking for one


def interrupted_then_resumed(argv: list[str], at_step: int, monkeypatch, check=lambda: True) -> None:
    """Runs train.main(argv), killed (KeyboardInterrupt) once step `at_step` is logged, checks
    `check()`, then resumes it with --resume."""
    real_log = training.log_step

    def interrupt(out, step, *a, **kw):
        record = real_log(out, step, *a, **kw)
        if step == at_step:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(training, "log_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    assert check()
    monkeypatch.setattr(training, "log_step", real_log)
    train.main(argv + ["--resume"])


@pytest.mark.parametrize("task", ["completion", "reconstruction"])
def test_validation_measures_both_tasks_of_an_ablation(world, tmp_path, task):
    train.main(args(world, tmp_path, "--steps", "1", "--tasks", task))
    validation = json.loads((tmp_path / "validation.jsonl").read_text())
    assert set(validation["ppl_with_adapter"]) == set(validation["ppl_base_alone"]) == set(TASKS)
    assert set(log(tmp_path)[0]) >= {f"loss_{task}"} and not set(log(tmp_path)[0]) & {f"loss_{t}" for t in TASKS if t != task}


def test_validation_reads_successive_batches(world, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train, "validate", lambda batches, step, **kw: seen.append(batches) or {})
    train.main(args(world, tmp_path, "--steps", "2", "--eval_interval", "1", "--eval_batches", "3"))
    first, second = seen  # drawn once, then reused: every validation sees the same batches
    assert first is second and len(first) == 3
    assert not torch.equal(first[0].tokens, first[1].tokens) and not torch.equal(first[1].tokens, first[2].tokens)


def test_curriculum_phases_and_learning_rate():
    config = train.parse_args(["--stage", "sft", "--curriculum", "fact:10,streams:20", "--warmup", "2"])
    assert config.steps == 30 and config.curriculum == ["fact:10", "streams:20"]
    assert [training.phase_at(s, config) for s in (0, 9, 10, 29, 35)] == [(0, 0, 10), (0, 0, 10), (1, 10, 20),
                                                                     (1, 10, 20), (1, 10, 20)]
    lr = [training.learning_rate(s, config) for s in range(30)]
    assert lr[10:12] == lr[0:2] and lr[1] == config.lr  # warm-up again at the new phase
    assert lr[9] < 0.2 * config.lr and lr[29] < 0.2 * config.lr  # cosine decay within each phase
    plain = train.parse_args(["--stage", "sft", "--data", "x.jsonl"])  # --data replaces the preset's ladder
    assert plain.curriculum == [] and training.phase_at(5, plain) == (0, 0, plain.steps)
    assert train.parse_args(["--stage", "sft"]).curriculum == train.TINY_PRESETS["sft"]["curriculum"]


def test_learning_rate_schedule():
    """Linear warm-up to lr, then a cosine that reaches lr / 10 at the phase's end; each
    curriculum phase starts the schedule afresh."""
    config = train.parse_args(["--stage", "sft", "--curriculum", "fact:10,people:20", "--warmup", "4",
                               "--lr", "1e-3"])
    lr = [training.learning_rate(s, config) for s in range(30)]
    assert lr[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # (step + 1) / warmup of the peak
    assert lr[4] == pytest.approx(1e-3) and lr[7] == pytest.approx(5.5e-4)  # cosine: peak, half-way
    assert all(a > b for a, b in zip(lr[4:10], lr[5:10]))
    assert lr[10:14] == lr[:4] and lr[14] == pytest.approx(1e-3)  # the second phase warms up again
    assert lr[22] == pytest.approx(5.5e-4)  # half-way through its 16 steps of decay
    assert training.learning_rate(30, config) == pytest.approx(1e-4)  # lr / 10 where the run ends
    single = train.parse_args(["--steps", "100", "--warmup", "10", "--lr", "1e-3"])  # no curriculum
    assert training.learning_rate(55, single) == pytest.approx(5.5e-4)
    assert training.learning_rate(100, single) == pytest.approx(1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--curriculum", "fact:10,novels:5"], "'novels:5' is not RUNG:STEPS"),
    (["--curriculum", "fact:0"], "'fact:0' is not RUNG:STEPS"),
    (["--curriculum", "fact:10", "--steps", "20"], "the --curriculum phases add up to 10 steps"),
    (["--curriculum", "fact:10", "--epochs", "2"], "a --curriculum sets the run's length"),
    (["--stage", "pretrain", "--curriculum", "fact:10"], "--curriculum is not used by --stage pretrain"),
    (["--curriculum", "fact:10", "--replay", "1.5"], "--replay 1.5: expected a share between 0 and 1"),
    (["--data", "records.jsonl", "--replay", "0.5"], "--replay is for --curriculum phases"),
    (["--stage", "pretrain", "--replay", "0.5"], "--replay is not used by --stage pretrain"),
])
def test_curriculum_flag_errors(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train.parse_args(["--stage", "sft", *flags])


@pytest.mark.parametrize("flags, low, high", [([], 0.05, 0.25), (["--replay", "0.75"], 0.6, 0.9),
                                              (["--replay", "0"], 0.0, 0.0)])
def test_curriculum_replays_the_earlier_phases(world, flags, low, high):
    """A phase's replayed records come from the rungs of the phases before it too: after
    `dialogue`, up to a share --replay of the `fact` phase's records (a quarter by default; `fact`
    has no rung below it) are dialogue sessions, long contexts, where a fact fits one window."""
    config = train.parse_args(["--stage", "sft", "--curriculum", "dialogue:5,fact:5", *flags])
    batches = train.CurriculumBatches(config, Tokenizer(world / "base" / "tokenizer.model"), w=64)
    fact_windows = [len(windows) for windows, _, _ in batches.examples(1, "train", 200)]
    assert low <= sum(n > 1 for n in fact_windows) / len(fact_windows) <= high


def test_curriculum_run_resumes_bit_identically(world, tmp_path, monkeypatch):
    """Two phases of ladder records (fact, then people), interrupted in the second phase."""
    train.main(args(world, tmp_path / "pre", "--steps", "1", "--window", "32", "--d_r", "32", "--r", "32",
                    "--k", "24"))
    sft = lambda out, *extra: ["--stage", "sft", "--base", str(world / "base"), "--out", str(out),
                               "--init", str(tmp_path / "pre" / "checkpoint"), "--curriculum", "fact:3,people:3",
                               "--batch_size", "4", "--micro_batch", "2", "--eval_interval", "3",
                               "--eval_batches", "1", "--log_interval", "1", "--ckpt_interval", "4",
                               "--warmup", "1", "--device", "cpu", *extra]
    train.main(sft(tmp_path / "straight"))
    interrupted_then_resumed(sft(tmp_path / "resumed"), 5, monkeypatch)
    keep = ("step", "loss", "lr", "grad_norm", "svd_guard_fired")
    straight, resumed = log(tmp_path / "straight"), log(tmp_path / "resumed")
    assert [{k: r[k] for k in keep} for r in resumed] == [{k: r[k] for k in keep} for r in straight]
    assert all(r["svd_guard_fired"] == 0 for r in straight)  # though most fact contexts are under k tokens
    validation = [json.loads(x) for x in (tmp_path / "straight" / "validation.jsonl").read_text().splitlines()]
    assert [(v["step"], v["phase"]) for v in validation] == [(3, "fact"), (6, "people")]


def test_a_few_steps_lower_the_loss(world, tmp_path):
    train.main(args(world, tmp_path, "--steps", "12", "--lr", "1e-2"))
    losses = [line["loss"] for line in log(tmp_path)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert {"loss_completion", "loss_reconstruction", "lr", "tokens_per_s", "svd_guard_fired"} <= set(log(tmp_path)[0])
    gen = AdapterGenerator.load(tmp_path / "checkpoint", random_model(tiny_args(vocab_size=4096)).args)
    assert gen.config.window == 16 and gen.config.k == 4


def test_sft_stage_runs_from_a_pretrained_generator(world, tmp_path):
    train.main(args(world, tmp_path / "pre", "--steps", "2", "--window", "32"))
    records = [{"context": " ".join(WORDS[i:] + WORDS[:i]), "prompt": f"Which word comes {i}th?",
                "answer": WORDS[i]} for i in range(8)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    train.main(["--stage", "sft", "--base", str(world / "base"), "--init", str(tmp_path / "pre" / "checkpoint"),
                "--data", str(tmp_path / "sft.jsonl"), "--val_data", str(tmp_path / "sft.jsonl"),
                "--out", str(tmp_path / "sft"), "--epochs", "2", "--batch_size", "4", "--micro_batch", "2",
                "--eval_interval", "2", "--eval_batches", "1", "--log_interval", "1", "--device", "cpu"])
    lines = log(tmp_path / "sft")
    assert len(lines) == 4  # 2 epochs of 8 records in batches of 4
    assert all(line["loss_answer"] > 0 and "loss_completion" not in line for line in lines)
    before = AdapterGenerator.load(tmp_path / "pre" / "checkpoint", random_model(tiny_args(vocab_size=4096)).args)
    after = AdapterGenerator.load(tmp_path / "sft" / "checkpoint", before.args)
    assert after.config == before.config
    assert not torch.equal(after.mods["o_proj"].B, before.mods["o_proj"].B)


def test_resume_is_bit_identical(world, tmp_path, monkeypatch):
    train.main(args(world, tmp_path / "straight"))
    # the run dies two steps after its checkpoint of step 3
    interrupted_then_resumed(args(world, tmp_path / "resumed"), 5, monkeypatch,
                             lambda: [r["step"] for r in log(tmp_path / "resumed")] == [1, 2, 3, 4, 5])
    straight, resumed = log(tmp_path / "straight"), log(tmp_path / "resumed")
    keep = ("step", "loss", "loss_completion", "loss_reconstruction", "lr", "grad_norm")
    assert [{k: r[k] for k in keep} for r in resumed] == [{k: r[k] for k in keep} for r in straight]
    validation = [json.loads(x) for x in (tmp_path / "resumed" / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validation] == [6]
    assert set(validation[0]["ppl_with_adapter"]) == {"completion", "reconstruction"}


def test_failed_checkpoint_write_keeps_the_previous(world, tmp_path, monkeypatch):
    real = AdapterGenerator.save

    def broken(self, directory):
        real(self, directory)
        if Path(directory).name == "checkpoint.tmp" and (Path(directory).parent / "checkpoint").exists():
            (Path(directory) / "generator.safetensors").write_bytes(b"half")
            raise OSError("disk full")

    monkeypatch.setattr(AdapterGenerator, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        train.main(args(world, tmp_path))
    state = torch.load(training.find_checkpoint(tmp_path) / "trainer.pt", weights_only=True)
    assert state["step"] == 3
    AdapterGenerator.load(training.find_checkpoint(tmp_path), random_model(tiny_args(vocab_size=4096)).args)


def one_ddp_step(argv: list[str], base: str, batches: list[training.Batch], rank: int, world: int) -> dict:
    """One training step of a generator (random B) on this rank's share of `batches`, wrapped in
    DistributedDataParallel when world > 1: the loss over the global batch and the new weights."""
    config = train.parse_args(argv)
    model = Transformer.from_pretrained(base)
    torch.manual_seed(0)
    gen = AdapterGenerator(model.args, config.generator)
    with torch.no_grad():
        for g in gen.mods.values():
            g.B.normal_(0, 0.3)
    module = DistributedDataParallel(gen) if world > 1 else gen
    forward = lambda b: module(model, b.tokens, b.mask, b.visible, b.supervised)
    stats = training.train_step(forward, list(gen.parameters()), batches[rank::world],
                                training.make_optimizer(gen, config), lr=1e-2, grad_clip=config.grad_clip,
                                n_tasks=2, ddp=module if world > 1 else None)
    if world > 1:
        torch.distributed.all_reduce(stats.sums)
        torch.distributed.all_reduce(stats.counts)
    return {"loss": stats.sums / stats.counts, "weights": gen.state_dict()}


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import training
from test_train import one_ddp_step
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.distributed.init_process_group("gloo")
batches = [training.Batch(*b) for b in torch.load({batches!r}, weights_only=True)]
result = one_ddp_step({argv!r}, {base!r}, batches, rank, world)
if rank == 0:
    torch.save(result, {out!r})
torch.distributed.barrier(); torch.distributed.destroy_process_group()  # leaving without it can abort gloo
"""


def test_ddp_equals_single_process(world, tmp_path):
    """torchrun with 2 processes, each half of a global batch of 2 sequences, takes the step
    that one process takes on the whole batch."""
    argv = args(world, tmp_path, "--svd", "exact")  # the randomized SVD's draws differ per process
    config = train.parse_args(argv)
    tok = Tokenizer(world / "base" / "tokenizer.model")
    stream = training.TextStream([str(world / "train.jsonl")], tok, 48, 16)
    source = train.PretrainBatches(stream, config, 0)
    batches = [source.next(1) for _ in range(2)]
    torch.save([[b.tokens, b.mask, b.targets, b.visible, b.task] for b in batches], tmp_path / "batches.pt")
    script = DDP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), argv=argv, base=str(world / "base"),
                               batches=str(tmp_path / "batches.pt"), out=str(tmp_path / "result.pt"))
    (tmp_path / "ddp.py").write_text(script)
    # one intra-op thread on both sides: the thread count changes float rounding (torchrun gives each
    # rank one thread when OMP_NUM_THREADS is unset; the reference would otherwise take all cores)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "ddp.py")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    two = torch.load(tmp_path / "result.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = one_ddp_step(argv, str(world / "base"), batches, 0, 1)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-6, rtol=1e-6)
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# Bad input


def test_data_without_text_field(world, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field 'text'"):
        train.main(args(world, tmp_path, "--data", str(tmp_path / "bad.jsonl")))


def test_empty_and_too_short_data(world, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no document of at least 16 tokens"):
        train.main(args(world, tmp_path, "--data", str(tmp_path / "empty.jsonl")))
    lines = [json.dumps({"text": "short"})] * 3 + [json.dumps({"text": " ".join(WORDS * 4)})]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    tok = Tokenizer(TOKENIZER)
    stream = training.TextStream([str(tmp_path / "mixed.jsonl")], tok, 48, 16)
    stream.next()
    assert stream.skipped == 3


def test_resume_with_other_hyperparameters(world, tmp_path):
    train.main(args(world, tmp_path, "--steps", "3"))
    with pytest.raises(ValueError, match=r"--resume with different hyperparameters: --lr was 0.003, now 0.001"):
        train.main(args(world, tmp_path, "--steps", "3", "--resume", "--lr", "1e-3"))
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint in"):
        train.main(args(world, tmp_path / "fresh", "--resume"))


def test_generator_for_another_base(world, tmp_path):
    train.main(args(world, tmp_path / "run", "--steps", "3"))
    other = tmp_path / "other"
    random_model(tiny_args(vocab_size=4096, n_layers=3, max_seq_len=256)).save_pretrained(other)
    shutil.copy(TOKENIZER, other / "tokenizer.model")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"context": "a b", "prompt": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="holds a generator for the base .* but this base is"):
        train.main(["--stage", "sft", "--base", str(other), "--init", str(tmp_path / "run" / "checkpoint"),
                    "--data", str(tmp_path / "sft.jsonl"), "--val_data", str(tmp_path / "sft.jsonl"),
                    "--out", str(tmp_path / "sft"), "--batch_size", "1", "--micro_batch", "1"])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: expected at least 1, got 0"),
    (["--steps", "-1"], "--steps: expected at least 1, got -1"),
    (["--batch_size", "0"], "--batch_size: expected at least 1, got 0"),
    (["--micro_batch", "3"], "--batch_size 16 is not a multiple of --micro_batch 3"),
    (["--lr", "-0.001"], "--lr: expected at least 0, got -0.001"),
    (["--grad_clip", "0"], "--grad_clip: expected a positive gradient norm, got 0.0"),
    (["--log_interval", "0"], "--log_interval: expected at least 1, got 0"),
    (["--k", "200"], r"--k = 200 is larger than min\(d_r, r\) = 128"),
    (["--tasks", "completion,translation"], "--tasks completion,translation: expected completion and/or reconstruction"),
    (["--stage", "finetune"], r"--stage finetune: expected one of \['pretrain', 'sft'\]"),
    (["--stage", "base"], "--stage base: the tiny base is trained by its own script, python data/make_base.py"),
    (["--stage", "sft", "--k", "8"], r"--k is not used by --stage sft \(the generator's settings come from --init"),
    (["--init", "runs/x"], "--init is not used by --stage pretrain"),
    (["--stage", "sft", "--steps", "5", "--epochs", "2"], "--steps and --epochs both set the length of the run"),
    (["--stage", "sft", "--init", ""], "--stage sft needs --init"),
    (["--resume", "--overwrite"], "--resume continues the run in --out, --overwrite deletes it"),
    (["--out", ""], "--out is empty"),
    (["--base", "/somewhere"], "is required with --base"),
    (["--base", "/somewhere", "--data", "texts.jsonl"], "--val_data is required with --base"),
])
def test_flag_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args(argv)


def test_flags_given_as_zero_are_honoured():
    config = train.parse_args(["--weight_decay", "0", "--warmup", "0", "--lr", "0", "--svd_niter", "0", "--seed", "0"])
    assert (config.weight_decay, config.warmup, config.lr, config.generator.svd_niter, config.seed) == (0, 0, 0, 0, 0)
    released = ["--stage", "sft", "--base", "b", "--data", "d.jsonl", "--val_data", "v.jsonl", "--init", "g"]  # 2 epochs
    assert train.parse_args(released).epochs == 2
    assert train.parse_args(released + ["--epochs", "0"]).epochs == 0
    assert (train.parse_args(released + ["--steps", "7"]).epochs, train.parse_args(released + ["--steps", "7"]).steps) == (0, 7)
    with pytest.raises(ValueError, match="--steps: expected at least 1, got 0"):
        train.TrainConfig(steps=0)  # a run configured in code is checked too


def test_an_earlier_run_is_kept_until_resumed_or_overwritten(world, tmp_path):
    train.main(args(world, tmp_path, "--steps", "3"))
    with pytest.raises(ValueError, match=r"--out .* holds an earlier run \(checkpoint, log.jsonl, validation.jsonl\): "
                                         "pass --resume to continue it, or --overwrite to delete it"):
        train.main(args(world, tmp_path, "--steps", "3"))
    trainer = tmp_path / "checkpoint" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:1000])  # a disk fault: the atomic swap rules out a torn write
    with pytest.raises(ValueError, match=r"checkpoint/trainer.pt: not a readable trainer state \(truncated or corrupt\?\)"):
        train.main(args(world, tmp_path, "--steps", "4", "--resume"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):  # the earlier run survives a failed start
        train.main(args(world, tmp_path, "--steps", "2", "--overwrite", "--data", str(tmp_path / "missing.jsonl")))
    assert [r["step"] for r in log(tmp_path)] == [1, 2, 3]
    train.main(args(world, tmp_path, "--steps", "2", "--overwrite"))
    assert [r["step"] for r in log(tmp_path)] == [1, 2]  # the first run's lines are gone
    assert torch.load(trainer, weights_only=True)["step"] == 2


def test_resume_in_a_moved_checkout_after_a_torn_log_line(world, tmp_path, monkeypatch):
    # the run and its data inside the repository, which then moves; the crash tore the last log line
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(world, old)
    monkeypatch.setattr(training, "ROOT", old)
    train.main(args(old, old / "run", "--steps", "3"))
    assert torch.load(old / "run" / "checkpoint" / "trainer.pt", weights_only=True)["config"]["base"] == "base"
    with open(old / "run" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 2.')
    old.rename(new)
    monkeypatch.setattr(training, "ROOT", new)
    train.main(args(new, new / "run", "--steps", "4", "--resume"))
    assert [r["step"] for r in log(new / "run")] == [1, 2, 3, 4]


def test_command_line_errors_are_one_line(world, tmp_path, capsys):
    sft = ["--stage", "sft", "--base", str(world / "base"), "--data", str(world / "train.jsonl"),
           "--val_data", str(world / "val.jsonl"), "--init", str(tmp_path / "none"), "--out", str(tmp_path / "sft")]
    for argv, message in [
            (args(world, tmp_path / "a", "--data", str(tmp_path / "missing.jsonl")), "missing.jsonl: no such file"),
            (args(world, tmp_path / "b", "--resume"), "--resume: no checkpoint in"),
            (sft, "none/generator.json does not exist"), (["--steps", "0"], "--steps: expected at least 1, got 0")]:
        with pytest.raises(SystemExit) as exit:
            cli.run(train.main, "train.py", argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith("train.py: error: ") and message in err and err.count("\n") == 1
    # the script itself: one line on stderr, exit status 2
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(world, tmp_path / "c", "--data", "nowhere.jsonl")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (done.returncode, done.stderr) == (2, "train.py: error: nowhere.jsonl: no such file or directory "
                                                 "(expected .jsonl/.jsonl.gz files)\n")
