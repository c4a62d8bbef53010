"""Train the toy world's sentencepiece tokenizer and write it to {data}/tiny/tokenizer.model.

The tokenizer is set up like Llama-2's and Mistral's: BPE with byte fallback (any text encodes, no
<unk> in practice), ids 0/1/2 for <unk>/<s>/</s> and no pad piece, digits split one by one, and no
text normalisation, so decode(encode(x)) == x. It is trained on the world's pretraining text plus
the instruction records rendered as chat text, "[INST] {context}\\n\\n{prompt} [/INST] {answer}", so
that the chat markers and instruction words get pieces of their own.

Training is deterministic: the input is read in a fixed order and sentencepiece runs on one thread.
Run it after data/make_world.py, from the repository root:

    python data/make_tokenizer.py [--vocab-size 4096] [--data data]
"""

import argparse
import io
import itertools
import sys
from pathlib import Path
from typing import Iterator

import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `data` importable
from data.readers import iter_texts, read_instructions  # noqa: E402


def chat_text(context: str, prompt: str, answer: str) -> str:
    """An instruction record in the Llama-2 / Mistral chat layout."""
    return f"[INST] {context}\n\n{prompt} [/INST] {answer}"


def training_lines(world: Path) -> Iterator[str]:
    """The non-empty lines of the pretraining text, then of the chat-rendered instructions.

    sentencepiece trains on one sentence per input line; paragraphs are short enough to be lines.
    """
    chats = (chat_text(r.context, r.prompt, r.answer) for r in read_instructions(world / "instructions_train.jsonl.gz"))
    for text in itertools.chain(iter_texts(world / "pretrain_train.jsonl.gz"), chats):
        yield from (line for line in text.split("\n") if line.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the generated world's text.")
    parser.add_argument("--vocab-size", type=int, default=4096, help="number of pieces (default: 4096)")
    parser.add_argument("--data", type=Path, default=Path("data"),
                        help="folder holding world/ (from make_world.py); writes tiny/tokenizer.model there "
                             "(default: data)")
    args = parser.parse_args(argv)

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_lines(args.data / "world"), model_writer=model,
        model_type="bpe", vocab_size=args.vocab_size, byte_fallback=True, character_coverage=1.0,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    out = args.data / "tiny" / "tokenizer.model"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())

    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    example = "[INST] Where was Maro Velin born? [/INST] Tesk"
    print(f"wrote {out} ({len(model.getvalue()) / 1024:.1f} KiB, vocab size {sp.vocab_size()})")
    print(f"{example!r} -> {sp.encode(example, out_type=str)}")


if __name__ == "__main__":
    main()
