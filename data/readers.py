"""Readers for the datasets GenerativeAdapter trains and evaluates on, in their public layouts.

    iter_texts           SlimPajama-style .jsonl / .jsonl.gz records {"text", ...}, streamed
    read_streamingqa     the CaMeLS StreamingQA CSV (columns text, question, answers)
    read_metaicl_config  MetaICL's config/{setting}.json: {"train": [tasks], "test": [tasks]}
    read_metaicl         MetaICL's {task}/{task}_{k}_{seed}_{split}.jsonl
    read_msc             MemGPT's MSC-Self-Instruct .jsonl
    read_instructions    instruction records {"context", "prompt", "answer"}

The embedded toy world in data/world/ uses these layouts (see data/README.md), and so do the real
datasets. Every error names the file, the line (or CSV row) and the field, and says what was expected.
"""

import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
STREAMINGQA_COLUMNS = ("text", "question", "answers")
MSC_SPEAKERS = ("Speaker 1", "Speaker 2")


@dataclass
class QARecord:
    document: str
    question: str
    answers: list[str]  # any of them is correct


@dataclass
class ICLExample:
    input: str
    output: str
    options: list[str]  # the label set of a classification task, [] for free-form output


@dataclass
class MSCRecord:
    previous_dialogs: list[list[tuple[str, str]]]  # sessions of (speaker, text) turns
    question: str
    answer: str


@dataclass
class Instruction:
    context: str
    prompt: str
    answer: str


# -----------------------------------------------------------------------------
# JSON lines

def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line of a .jsonl or .jsonl.gz file."""
    gz = path.name.endswith(".gz")
    line_no = 0
    try:
        with (gzip.open if gz else open)(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    message = f"{path}:{line_no}: invalid JSON ({e.msg}); expected one JSON object per line"
                    raise ValueError(message) from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield line_no, record
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, OSError, EOFError) as e:  # binary, not gzip, or cut short
        expected = "gzip-compressed UTF-8 text" if gz else "UTF-8 text"
        raise ValueError(f"{path}:{line_no + 1}: unreadable ({e}); expected {expected}") from None


def _field(record: dict, name: str, expected: type, where: str, label: str = ""):
    """record[name], checked to exist and have the expected type; `label` is its name in errors."""
    label = label or name
    if name not in record:
        raise ValueError(f"{where}: missing field '{label}' (expected a {expected.__name__})")
    value = record[name]
    if not isinstance(value, expected):
        raise ValueError(f"{where}: field '{label}' should be a {expected.__name__}, got {type(value).__name__}")
    return value


def _jsonl_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The .jsonl / .jsonl.gz files named by paths; a directory stands for its such files, sorted."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"{path}: directory holds no .jsonl or .jsonl.gz files")
            files += found
        elif path.is_file() and path.name.endswith(JSONL_SUFFIXES):
            files.append(path)
        elif path.is_file():
            raise FileNotFoundError(f"{path}: not a .jsonl or .jsonl.gz file")
        else:
            raise FileNotFoundError(f"{path}: no such file or directory (expected .jsonl/.jsonl.gz files)")
    if not files:
        raise FileNotFoundError("iter_texts: no paths given (expected .jsonl/.jsonl.gz files or directories)")
    return files


def iter_texts(paths: str | Path | Iterable[str | Path]) -> Iterator[str]:
    """Stream the "text" field of every record, one record at a time, file by file.

    paths: one path or several; each a .jsonl / .jsonl.gz file, or a directory whose such files are
    read in sorted order. Missing paths raise FileNotFoundError at once; a record without a string
    "text" raises ValueError (naming file and line) when it is reached.
    """
    files = _jsonl_files(paths)

    def texts() -> Iterator[str]:
        for path in files:
            for line_no, record in _jsonl_records(path):
                yield _field(record, "text", str, f"{path}:{line_no}")

    return texts()


def read_instructions(path: str | Path) -> list[Instruction]:
    """Instruction records {"context", "prompt", "answer"} from a .jsonl or .jsonl.gz file."""
    path = Path(path)
    records = []
    for line_no, record in _jsonl_records(path):
        where = f"{path}:{line_no}"
        context, prompt, answer = (_field(record, name, str, where) for name in ("context", "prompt", "answer"))
        if not answer.strip():
            raise ValueError(f"{where}: field 'answer' is empty (expected the target text)")
        records.append(Instruction(context, prompt, answer))
    return records


# -----------------------------------------------------------------------------
# StreamingQA (CaMeLS CSV)

def read_streamingqa(path: str | Path) -> list[QARecord]:
    """The CaMeLS StreamingQA CSV: one row per question, gold answers joined by a backslash."""
    path = Path(path)
    records = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            found = reader.fieldnames or []
            missing = [c for c in STREAMINGQA_COLUMNS if c not in found]
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; "
                                 f"columns found: {', '.join(found) or 'none'}")
            for row_no, row in enumerate(reader, 1):
                where = f"{path}: row {row_no} (line {reader.line_num})"
                for column in STREAMINGQA_COLUMNS:
                    if row[column] is None:
                        raise ValueError(f"{where}: no '{column}' cell (the row has fewer cells than the header)")
                answers = [a.strip() for a in row["answers"].split("\\") if a.strip()]
                if not answers:
                    raise ValueError(f"{where}: column 'answers' is empty (expected answers joined by a backslash)")
                records.append(QARecord(row["text"], row["question"], answers))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: unreadable ({e}); expected UTF-8 text") from None
    return records


# -----------------------------------------------------------------------------
# MetaICL

def read_metaicl_config(path: str | Path) -> dict[str, list[str]]:
    """A MetaICL config such as config/hr_to_lr.json: {"train": [task, ...], "test": [task, ...]}."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: unreadable ({e}); expected UTF-8 JSON") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object with 'train' and 'test' lists")
    for split in ("train", "test"):
        tasks = config.get(split)
        if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"{path}: field '{split}' should be a list of task names, got {tasks!r}")
    return {"train": config["train"], "test": config["test"]}


def read_metaicl(data_dir: str | Path, task: str, k: int, seed: int, split: str) -> list[ICLExample]:
    """MetaICL examples from {data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl.

    Records are {"task", "input", "output", "options"}; for a classification task (options not
    empty) the output must be one of the options.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such directory (expected MetaICL's data folder of task folders)")
    task_dir = data_dir / task
    if not task_dir.is_dir():
        tasks = sorted(d.name for d in data_dir.iterdir() if any(d.glob(f"{d.name}_*.jsonl")))
        raise FileNotFoundError(f"{data_dir}: no task '{task}'; tasks found: {', '.join(tasks) or 'none'}")
    path = task_dir / f"{task}_{k}_{seed}_{split}.jsonl"
    if not path.is_file():
        available = sorted(p.name for p in task_dir.glob("*.jsonl"))
        raise FileNotFoundError(f"{path}: no such file; files for task '{task}': {', '.join(available) or 'none'}")
    examples = []
    for line_no, record in _jsonl_records(path):
        where = f"{path}:{line_no}"
        if _field(record, "task", str, where) != task:
            raise ValueError(f"{where}: field 'task' is {record['task']!r}, expected {task!r}")
        example = ICLExample(_field(record, "input", str, where), _field(record, "output", str, where),
                             _field(record, "options", list, where))
        if example.options and example.output not in example.options:
            raise ValueError(f"{where}: field 'output' {example.output!r} is not one of 'options' {example.options}")
        examples.append(example)
    return examples


# -----------------------------------------------------------------------------
# MSC-Self-Instruct

def _msc_sessions(sessions: list, where: str) -> list[list[tuple[str, str]]]:
    """previous_dialogs -> sessions of (speaker, text) turns, checking each turn."""
    dialogs = []
    for i, session in enumerate(sessions):
        if not isinstance(session, dict):
            raise ValueError(f"{where}: previous_dialogs[{i}] should be an object with a 'dialog' list, "
                             f"got {type(session).__name__}")
        turns = _field(session, "dialog", list, where, f"previous_dialogs[{i}].dialog")
        dialog = []
        for j, turn in enumerate(turns):
            if not (isinstance(turn, dict) and turn.get("id") in MSC_SPEAKERS and isinstance(turn.get("text"), str)):
                raise ValueError(f"{where}: previous_dialogs[{i}].dialog[{j}] should be "
                                 f"{{\"id\": \"Speaker 1\" or \"Speaker 2\", \"text\": string}}, got {turn!r}")
            dialog.append((turn["id"], turn["text"]))
        dialogs.append(dialog)
    return dialogs


def read_msc(path: str | Path) -> list[MSCRecord]:
    """MSC-Self-Instruct records: earlier sessions, then a question (self_instruct.B) and its answer (.A)."""
    path = Path(path)
    records = []
    for line_no, record in _jsonl_records(path):
        where = f"{path}:{line_no}"
        sessions = _field(record, "previous_dialogs", list, where)
        if not sessions:
            raise ValueError(f"{where}: field 'previous_dialogs' is empty (expected earlier sessions)")
        self_instruct = _field(record, "self_instruct", dict, where)
        question = _field(self_instruct, "B", str, where, "self_instruct.B")
        answer = _field(self_instruct, "A", str, where, "self_instruct.A")
        if not answer.strip():
            raise ValueError(f"{where}: field 'self_instruct.A' (the answer) is empty")
        records.append(MSCRecord(_msc_sessions(sessions, where), question, answer))
    return records
