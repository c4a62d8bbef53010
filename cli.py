"""What the command-line scripts (train.py, evaluate.py, bench.py, data/make_base.py) share: errors
reported in one line, flags made from config dataclasses, the --device flag with the dtype and
autocast that go with the device, peak memory, and result files in strict JSON.

Bad input (a flag, a data file, a checkpoint) raises ValueError or OSError with a message that
names the flag, file or field and what was expected. `run` reports it as argparse reports its own
errors: one line `train.py: error: <message>` on stderr, exit status 2. With GA_TRACEBACK=1 in the
environment the exception propagates with its full traceback instead. Any other exception is a
bug, and keeps its traceback.
"""

import argparse
import contextlib
import json
import math
import os
import re
import sys
import typing
from dataclasses import Field, fields, is_dataclass
from typing import Callable

import torch

TRACEBACK = "GA_TRACEBACK"
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available)"
EPILOG = (f"Errors in the input are reported in one line, with exit status 2; set {TRACEBACK}=1 "
          "in the environment to see the full traceback.")


def run(main, prog: str, argv: list[str] | None = None):
    """Returns main(argv); bad input ends the program with one line on stderr and exit status 2."""
    try:
        return main(argv)
    except (ValueError, OSError) as err:
        if os.environ.get(TRACEBACK, "0") not in ("", "0"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


# -----------------------------------------------------------------------------
# Flags made from config dataclasses (each field a model.setting, its help text in its metadata)


def settings(config: type) -> list[Field]:
    """The settings of a config dataclass, one flag each: the fields it declares, then those it
    inherits; a nested config (a field whose type is a dataclass) stands for its own settings."""
    inherited = {f.name for base in config.__mro__[1:] if is_dataclass(base) for f in fields(base)}
    ordered = sorted(fields(config), key=lambda f: f.name in inherited)  # stable: declaration order
    return [s for f in ordered for s in (settings(f.type) if is_dataclass(f.type) else [f])]


def add_flags(parser: argparse.ArgumentParser, config: type, note: Callable[[str], str]) -> None:
    """A flag --NAME for every setting of a config dataclass, with its help text and, but for a
    switch, note(NAME). Flags not given parse to None (or False), so that given_flags tells them
    apart."""
    for f in settings(config):
        text = f.metadata["help"] + note(f.name)
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        elif f.metadata["path"] and typing.get_origin(f.type) is list:
            parser.add_argument(f"--{f.name}", nargs="+", default=None, help=text)
        else:
            kind = f.type if f.type in (int, float) else str
            parser.add_argument(f"--{f.name}", type=kind, default=None, help=text)


def given_flags(parser: argparse.ArgumentParser, config: type, argv: list[str] | None) -> dict:
    """The flags given on the command line, by name, as their settings' values (comma-separated
    lists split)."""
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None and v is not False}
    lists = {f.name for f in settings(config) if typing.get_origin(f.type) is list and not f.metadata["path"]}
    return {k: v.split(",") if k in lists else v for k, v in given.items()}


def from_flags(config: type, values: dict):
    """A config dataclass made from settings by flag name (missing ones keep their defaults); its
    checks run as it is made, and a nested config's errors name its settings as flags too."""
    kwargs = {}
    for f in fields(config):
        if is_dataclass(f.type):
            try:
                kwargs[f.name] = from_flags(f.type, values)
            except ValueError as err:  # "GeneratorConfig.k = 200 ..." -> "--k = 200 ..."
                raise ValueError(str(err).replace(f"{f.type.__name__}.", "--")) from None
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return config(**kwargs)


def flag_values(config) -> dict:
    """A config's settings by flag name, a nested config's included: from_flags made backwards."""
    values = {}
    for f in fields(config):
        value = getattr(config, f.name)
        values |= flag_values(value) if is_dataclass(f.type) else {f.name: value}
    return values


# -----------------------------------------------------------------------------
# The device


def pick_device(name: str | None) -> torch.device:
    """The --device flag: cpu, cuda or cuda:N (default: cuda when available, else cpu)."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available to torch {torch.__version__}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype a frozen base runs in: bfloat16 on CUDA, float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device):
    """bf16 autocast on CUDA (generator weights stay float32), nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class PeakMemory:
    """Peak memory inside the block: CUDA's allocator on a GPU; on Linux CPUs the process's
    peak resident set (VmHWM), reset on entry through /proc/self/clear_refs. `peak_mb` is the
    peak; `extra_mb` the peak less what was in use on entry (what the block itself added)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self.extra_mb = device, None, None

    def _read_mb(self, peak: bool) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            read = torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated
            return read(self.device) / 2**20
        if not os.path.exists("/proc/self/status"):
            return None
        key = "VmHWM" if peak else "VmRSS"
        return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.start_mb = self._read_mb(peak=False)
        return self

    def __exit__(self, *exc):
        self.peak_mb = self._read_mb(peak=True)
        if self.peak_mb is not None:
            self.extra_mb = self.peak_mb - self.start_mb
        return False


def strict_json(value) -> str:
    """JSON text of results, with NaN and infinities written as null (Python's json module writes
    them bare, which JSON readers other than Python's reject)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value), indent=2, allow_nan=False)
