"""Train the tiny base's sentencepiece tokenizer and write it to {out}/tokenizer.model.

The tokenizer is set up like Llama-2's and Mistral's: BPE with byte fallback (any text encodes, no
<unk> in practice), ids 0/1/2 for <unk>/<s>/</s> and no pad piece, digits split one by one, and no
text normalisation, so decode(encode(x)) == x. It trains on text and on instruction records
rendered as chat text, "[INST] {context}\\n\\n{prompt} [/INST] {answer}", so that the chat markers
and instruction words get pieces of their own, from one of two sources (--source):

  world  the bundled world's pretraining text and train instructions (data/world/, from
         data/make_world.py): the committed data/tiny/tokenizer.model, byte for byte;
  fresh  what the base reads (data/fresh_worlds.py): text windows about fresh worlds and the
         library, and instruction records drawn by MIX. The base never reads data/world/, and a
         piece made only for words it never reads gets nothing but the gradient that lowers its
         logit, the same for every such piece: with the world's tokenizer 1,403 of the 3,837
         pieces of words of the bundled base ended on one direction (data/make_base.alike_pieces).

Training is deterministic: the input is read in a fixed order (fresh draws are functions of their
keys) and sentencepiece runs on one thread. Run it from the repository root:

    python data/make_tokenizer.py                                 # data/tiny/tokenizer.model
    python data/make_tokenizer.py --source fresh --out runs/v3    # trained on fresh worlds
"""

import argparse
import io
import itertools
import sys
from pathlib import Path
from typing import Iterator

import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `data` importable
from data.fresh_worlds import MIX, FreshWorlds  # noqa: E402
from data.readers import iter_texts, read_instructions  # noqa: E402
from model import atomic_write  # noqa: E402

TEXTS, RECORDS = 5000, 20000  # --source fresh: text windows and instruction records drawn to train on


def chat_text(context: str, prompt: str, answer: str, follow_ups: list[tuple[str, str]] = ()) -> str:
    """An instruction record in the Llama-2 / Mistral chat layout."""
    return f"[INST] {context}\n\n{prompt} [/INST] {answer}" + "".join(f" [INST] {p} [/INST] {a}" for p, a in follow_ups)


def world_texts(world: Path) -> Iterator[str]:
    """The pretraining text, then the chat-rendered train instructions, of the bundled world."""
    chats = (chat_text(r.context, r.prompt, r.answer) for r in read_instructions(world / "instructions_train.jsonl.gz"))
    return itertools.chain(iter_texts(world / "pretrain_train.jsonl.gz"), chats)


def fresh_texts(worlds: FreshWorlds, texts: int = TEXTS, records: int = RECORDS) -> Iterator[str]:
    """Fresh text windows (every other one about the library), then chat-rendered fresh records."""
    yield from (worlds.text(f"tokenizer/{i}", library=i % 2 == 0) for i in range(texts))
    for i in range(records):
        r = worlds.instruction(f"tokenizer/{i}", MIX)
        yield chat_text(r["context"], r["prompt"], r["answer"], r["follow_ups"])


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> bytes:
    """The serialized sentencepiece model trained on the non-empty lines of `texts` (sentencepiece
    trains on one sentence per input line; paragraphs are short enough to be lines)."""
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    return model.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the tiny base's BPE tokenizer.")
    parser.add_argument("--source", choices=("world", "fresh"), default="world",
                        help="train on the bundled world's text (world; the committed tokenizer) or on the "
                             "fresh worlds the base reads (fresh) (default: world)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="number of pieces (default: 4096)")
    parser.add_argument("--data", type=Path, default=Path("data"),
                        help="--source world: the folder holding world/ (from make_world.py) (default: data)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder to write tokenizer.model to (default: DATA/tiny)")
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        parser.error(f"--vocab-size {args.vocab_size}: expected at least 300 (the 259 byte and control pieces "
                     "and some of words)")
    if args.source == "world" and not (args.data / "world" / "pretrain_train.jsonl.gz").is_file():
        parser.error(f"--data {args.data}: no world/pretrain_train.jsonl.gz there (run data/make_world.py first)")

    texts = world_texts(args.data / "world") if args.source == "world" else fresh_texts(FreshWorlds())
    model = train_tokenizer(texts, args.vocab_size)
    out = (args.out or args.data / "tiny") / "tokenizer.model"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda path: path.write_bytes(model))

    sp = spm.SentencePieceProcessor(model_proto=model)
    example = "[INST] Where was Maro Velin born? [/INST] Tesk"
    print(f"wrote {out} ({len(model) / 1024:.1f} KiB, vocab size {sp.vocab_size()})")
    print(f"{example!r} -> {sp.encode(example, out_type=str)}")


if __name__ == "__main__":
    main()
