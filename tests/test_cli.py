"""cli.py: what the command-line scripts share (one-line errors, flags from config dataclasses,
--device, peak memory, strict JSON)."""

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import cli
from model import setting


def fails(exception):
    def main(argv):
        raise exception
    return main


def test_bad_input_is_one_line_with_exit_status_2(capsys):
    for error in (ValueError("--steps: expected at least 1,\ngot 0"), FileNotFoundError("x.jsonl: no such file")):
        with pytest.raises(SystemExit) as exit:
            cli.run(fails(error), "train.py", [])
        assert exit.value.code == 2
        assert capsys.readouterr().err == f"train.py: error: {' '.join(str(error).split())}\n"
    assert cli.run(lambda argv: argv, "train.py", ["--steps", "3"]) == ["--steps", "3"]


def test_traceback_on_request_and_for_bugs(monkeypatch):
    with pytest.raises(KeyError):  # not bad input: a bug keeps its traceback
        cli.run(fails(KeyError("step")), "train.py")
    monkeypatch.setenv(cli.TRACEBACK, "1")
    with pytest.raises(ValueError, match="expected at least 1"):
        cli.run(fails(ValueError("--steps: expected at least 1, got 0")), "train.py")


@dataclass
class Inner:
    k: int = setting(4, "rank")

    def __post_init__(self):
        if self.k > 8:
            raise ValueError(f"Inner.k = {self.k} is larger than 8")


@dataclass
class Outer:
    files: list[str] = setting([], "files", path=True)
    names: list[str] = setting(["a"], "names")
    inner: Inner = field(default_factory=Inner)
    quick: bool = setting(False, "a switch")


@dataclass
class Derived(Outer):
    rate: float = setting(0.5, "a rate")


def test_flags_from_config_dataclasses():
    parser = argparse.ArgumentParser()
    cli.add_flags(parser, Derived, lambda name: f" (default {name})")
    assert [f.name for f in cli.settings(Derived)] == ["rate", "files", "names", "k", "quick"]  # own first
    given = cli.given_flags(parser, Derived, ["--files", "x.jsonl", "y.jsonl", "--names", "b,c", "--k", "8"])
    assert given == {"files": ["x.jsonl", "y.jsonl"], "names": ["b", "c"], "k": 8}
    config = cli.from_flags(Derived, given)
    assert config == Derived(files=["x.jsonl", "y.jsonl"], names=["b", "c"], inner=Inner(k=8))
    assert cli.flag_values(config) == {"files": ["x.jsonl", "y.jsonl"], "names": ["b", "c"], "k": 8,
                                       "quick": False, "rate": 0.5}
    assert Outer().names is not Outer().names  # a list default is a fresh list per config
    with pytest.raises(ValueError, match=r"^--k = 9 is larger than 8$"):  # a nested config's error names the flag
        cli.from_flags(Derived, {"k": 9})


def test_device_flag():
    assert cli.pick_device("cpu") == torch.device("cpu")
    assert cli.pick_device(None).type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="--device gpu: expected cpu, cuda or cuda:N"):
        cli.pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA device is available"):
            cli.pick_device("cuda")


def test_results_are_strict_json():
    text = cli.strict_json({"accuracy": float("nan"), "rows": [{"tokens_per_s": float("inf"), "f1": 0.5}]})
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert strict == {"accuracy": None, "rows": [{"tokens_per_s": None, "f1": 0.5}]}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_peak_memory_sees_an_allocation():
    """In a fresh interpreter: in the suite's process, memory that earlier tests free while the block
    runs lowers the resident set and so the measured peak (seen as a rare failure)."""
    code = ("import torch, cli\n"
            "with cli.PeakMemory(torch.device('cpu')) as memory:\n"
            "    x = torch.ones(25 * 2**20)  # 100 MB, written so that every page is resident\n"
            "    del x\n"
            "print(memory.extra_mb, memory.peak_mb)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(cli.__file__).parent, capture_output=True,
                         text=True, check=True)
    extra_mb, peak_mb = map(float, out.stdout.split())
    assert 95 < extra_mb < 110 and peak_mb >= extra_mb
