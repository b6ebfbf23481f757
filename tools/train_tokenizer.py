#!/usr/bin/env python
"""Train a SentencePiece tokenizer on JSONL text, ready for --tokenizer-type SentencePieceTokenizer.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text \\
        --vocab-size 8000 --output-prefix tok        # writes tok.model and tok.vocab

An existing tok.model or tok.vocab is refused unless --overwrite; training writes under a temporary
prefix next to them and both files are renamed into place at the end.

Special ids: 0 <pad>, 1 <unk>, 2 <s> (BOS), 3 <EOD> (SentencePiece's EOS piece). `<EOD>` is the
end-of-document id that `tools/preprocess_data.py --append-eod` appends, and Megatron-LM reads the
same model the same way (its GPTSentencePieceTokenizer takes EOS as EOD, its legacy
SentencePieceTokenizer looks the piece `<EOD>` up). Pad never occurs in data, so megatron-core's
datasets can mask it.

Llama-style settings: BPE (or unigram), byte fallback (every string encodes, decode(encode(s)) == s),
digits split, no whitespace normalisation. Each line of each document is one training sentence.
Deterministic: fixed random seed, input read in file order.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ted.cli import OneLineErrorParser  # noqa: E402
from megatron_ted.data.output_files import (  # noqa: E402
    create_temporary, make_output_dir, refuse_existing, remove_created_dirs, remove_temporaries)

SPECIALS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>",
                bos_piece="<s>", eos_piece="<EOD>")


def iter_sentences(path: str, json_keys: list[str]):
    """Yield the non-empty lines of every document, in file order; ValueError on bad input."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--input {path} line {lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            for key in json_keys:
                if not isinstance(record, dict) or key not in record:
                    raise ValueError(f"--input {path} line {lineno}: no key {key!r} (see --json-keys)")
                texts = record[key] if isinstance(record[key], list) else [record[key]]
                for text in texts:
                    for sentence in str(text).split("\n"):
                        if sentence.strip():
                            yield sentence


def train(input_path: str, output_prefix: str, vocab_size: int, json_keys=("text",),
          model_type: str = "bpe", input_sentence_size: int = 2_000_000, seed: int = 1234,
          num_threads: int | None = None, verbose: bool = False) -> str:
    """Train and write `<output_prefix>.model` / `.vocab`; returns the model path."""
    import sentencepiece as spm

    input_errors = []  # SentencePiece turns an exception of the iterator into a RuntimeError with a code location

    def sentences():
        try:
            yield from iter_sentences(input_path, list(json_keys))
        except ValueError as err:
            input_errors.append(err)
            raise

    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=output_prefix,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,          # a small corpus may not support the full vocab: shrink
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 14,
            input_sentence_size=input_sentence_size,   # sample at most this many lines...
            shuffle_input_sentence=True,               # ...uniformly (seeded above)
            num_threads=num_threads or min(16, os.cpu_count() or 1),
            minloglevel=0 if verbose else 2,
            **SPECIALS,
        )
    except RuntimeError:
        if input_errors:
            raise input_errors[0] from None
        raise
    return output_prefix + ".model"


def name_prefix_in_model(model_path: str, prefix: str) -> None:
    """SentencePiece records the training prefix in the model: record the user's, not the temporary
    one, so that the file is the same whatever the temporary name was."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    proto.trainer_spec.model_prefix = prefix
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString())


def main(argv=None) -> int:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="JSONL file")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the text")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing <prefix>.model / <prefix>.vocab")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="train on at most this many lines, sampled with --seed")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    args = parser.parse_args(argv)

    if not os.path.isfile(args.input):
        print(f"error: --input {args.input}: file not found", file=sys.stderr)
        return 2
    min_vocab = 4 + 256 + 1  # specials + byte fallback + at least one piece
    if args.vocab_size < min_vocab:
        print(f"error: --vocab-size {args.vocab_size}: must be >= {min_vocab} "
              "(4 special ids and 256 byte-fallback ids come first)", file=sys.stderr)
        return 2
    outputs = [args.output_prefix + ".model", args.output_prefix + ".vocab"]
    try:  # existing outputs stay as they were unless --overwrite; a failed run leaves nothing
        refuse_existing(outputs, "--output-prefix", args.overwrite)
        created = make_output_dir(args.output_prefix, "--output-prefix")
        # SentencePiece writes <prefix>.model/.vocab itself: train under a temporary prefix of ours
        tmp_prefix = create_temporary(args.output_prefix, (".model", ".vocab"))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    done = False
    try:
        train(args.input, tmp_prefix, args.vocab_size, args.json_keys, args.model_type,
              args.input_sentence_size, args.seed, args.num_threads, args.verbose)
        name_prefix_in_model(tmp_prefix + ".model", args.output_prefix)
        for suffix in (".model", ".vocab"):
            os.replace(tmp_prefix + suffix, args.output_prefix + suffix)
        done = True
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # SentencePiece's own complaints
        message = str(err).strip().splitlines()[-1]
        if "sentences_.empty()" in message:
            message = f"--input {args.input}: no text under --json-keys {' '.join(args.json_keys)}"
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        if not done:
            remove_temporaries([tmp_prefix + ".model", tmp_prefix + ".vocab"])
            remove_created_dirs(args.output_prefix, created)
    model = outputs[0]

    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    print(f"wrote {model} ({args.model_type}, {sp.get_piece_size()} pieces, eod id {sp.eos_id()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
