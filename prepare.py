"""
Prepare a training set: read a text/code corpus, train (or load) a tokenizer, write token files.

    python prepare.py                          # Python's own standard library -> data/stdlib/
    python prepare.py --input ~/code --out data/mycode
    python prepare.py --tokenizer tokenizer.json   # reuse a tokenizer, e.g. ModernBERT's own

Output directory:
    tokenizer.json                 the tokenizer the ids belong to
    train.bin, val.bin             flat token ids (uint16 or uint32), every document stored
                                   as [CLS] tokens... [SEP], documents concatenated
    train_offsets.npy, val_offsets.npy   int64 document starts, length n_docs + 1
                                   (offsets[0] = 0, offsets[-1] = len(tokens))
    meta.json                      vocab size, special ids, dtype, counts, source.
                                   Written last: it marks the directory as complete.
"""
import argparse
import glob
import io
import json
import os
import random
import sys
import sysconfig
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"]
DEFAULT_OUT = "data/stdlib"
VAL_FRACTION, VAL_CHARS = 0.05, 1_200_000  # the split's defaults


def fail(message):
    """Bad input: one line `prepare.py: error: ...`, exit status 1, nothing written."""
    raise SystemExit(f"prepare.py: error: {message}")


# ----------------------------------------------------------------------------- finding files

def stdlib_files():
    """Every *.py file of the running Python's standard library, tests included, without the
    third-party packages installed into it (site-packages), which are not part of it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not {"site-packages", "dist-packages"} & set(p.parts)]
    return sorted(files), (f"python {sys.version.split()[0]} stdlib: {root}/**/*.py "
                           "(site-packages excluded)")


def input_files(inputs):
    """Files named on the command line: files, directories (recursed; hidden entries such as
    .git are skipped) and glob patterns. Sorted and deduplicated so the order never depends on
    the file system."""
    files = set()
    for arg in inputs:
        matches = glob.glob(arg, recursive=True) if glob.has_magic(arg) else [arg]
        if not matches:
            raise FileNotFoundError(f"no file or directory matches {arg!r}")
        for m in map(Path, matches):
            if m.is_dir():
                files.update(p for p in m.rglob("*") if p.is_file()
                             and not any(part.startswith(".") for part in p.relative_to(m).parts))
            elif m.is_file():
                files.add(m)
            else:
                raise FileNotFoundError(f"no such file or directory: {str(m)!r}")
    return sorted(files)


def read_documents(files):
    """One document per file, and the file it came from. Empty and non-UTF-8 (or binary) files are
    skipped and counted."""
    docs, kept, skipped = [], [], {"empty": 0, "undecodable": 0}
    for path in tqdm(files, desc="reading", unit="file"):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["undecodable"] += 1
            continue
        if "\x00" in text:  # valid UTF-8 but binary
            skipped["undecodable"] += 1
        elif not text.strip():
            skipped["empty"] += 1
        else:
            docs.append(text)
            kept.append(path)
    return docs, kept, skipped


# ----------------------------------------------------------------------------- splitting

def val_indices(lengths, val_fraction, val_chars, seed):
    """Which documents (by index) go to val: whole documents, in a seeded random order, until val
    holds min(val_fraction of the corpus, val_chars) characters."""
    target = min(val_fraction * sum(lengths), val_chars)
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    val, size = set(), 0
    for i in order[:-1]:  # the last one always stays in train
        if val and size >= target:
            break
        val.add(i)
        size += lengths[i]
    return val


def split_train_val(docs, val_fraction, val_chars, seed):
    """(train_docs, val_docs), split by val_indices. Both splits keep file order."""
    val = val_indices([len(d) for d in docs], val_fraction, val_chars, seed)
    train_docs = [d for i, d in enumerate(docs) if i not in val]
    val_docs = [d for i, d in enumerate(docs) if i in val]
    return train_docs, val_docs


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(docs, vocab_size):
    """Byte-level BPE like ModernBERT's (GPT-2 style pre-tokenizer, no prefix space), without a
    normalizer so that decoding gives back the exact text. [MASK] swallows the space before it
    (lstrip, as in the released tokenizer): byte-level BPE keeps a word's leading space inside
    its token, so in "a [MASK]" the mask stands for the whole token " b" of "a b"."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, lstrip=(t == "[MASK]"), special=True) for t in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer, length=len(docs))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return tok


def check_tokenizer(tok):
    """Ids of the special tokens the model needs; ValueError if any is missing or if the
    post-processor does not wrap a text as [CLS] ... [SEP] (how every document is stored)."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {', '.join(missing)}")
    ids = {f"{t.strip('[]').lower()}_id": i for t, i in ids.items()}  # "[CLS]" -> "cls_id"
    wrapped = tok.encode("x").ids
    if (wrapped[0], wrapped[-1]) != (ids["cls_id"], ids["sep_id"]):
        raise ValueError("tokenizer's post-processor does not wrap a text as [CLS] ... [SEP]")
    return ids


def tokenizer_to_reuse(path):
    """--tokenizer FILE: a tokenizer.json with the special tokens the model needs."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for a missing or broken file
        raise ValueError(f"cannot load tokenizer {str(path)!r}: {e}")
    try:
        check_tokenizer(tok)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return tok


# ----------------------------------------------------------------------------- encoding, writing

def encode_documents(tok, docs, dtype, desc, batch_size=256):
    """Token ids of all documents, each as [CLS] ... [SEP], and the document start offsets."""
    tok.no_truncation()  # a loaded tokenizer.json may carry truncation or padding settings
    tok.no_padding()
    tok.encode_special_tokens = True  # a literal "[CLS]" inside a document is text, not a marker
    arrays = []
    with tqdm(total=len(docs), desc=desc, unit="doc") as bar:
        for i in range(0, len(docs), batch_size):  # encode_batch runs on all cores
            arrays += [np.array(e.ids, dtype=dtype)
                       for e in tok.encode_batch(docs[i:i + batch_size])]
            bar.update(len(docs[i:i + batch_size]))
    tok.encode_special_tokens = False
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    return np.concatenate(arrays), offsets


def as_bytes(name, value):
    """The file content of one output: text, a .npy array, or raw token ids."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if name.endswith(".npy"):
        buffer = io.BytesIO()
        np.save(buffer, value)
        return buffer.getvalue()
    return memoryview(np.ascontiguousarray(value)).cast("B")  # raw ids, no copy


def write_outputs(out_dir, outputs):
    """Write every output to NAME.tmp, then rename them all. meta.json goes last (and the old
    one is removed first), so a reader never pairs a meta.json with files from another run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = {name: out_dir / f"{name}.tmp" for name in outputs}
    data = {name: as_bytes(name, value) for name, value in outputs.items()}
    try:
        with tqdm(total=sum(map(len, data.values())), desc="writing", unit="B",
                  unit_scale=True) as bar:
            for name, content in data.items():
                with open(tmp[name], "wb") as f:
                    for i in range(0, len(content), 1 << 24):  # 16 MB at a time, for the bar
                        chunk = content[i:i + (1 << 24)]
                        f.write(chunk)
                        bar.update(len(chunk))
        (out_dir / "meta.json").unlink(missing_ok=True)
        for name in sorted(outputs, key=lambda n: n == "meta.json"):
            os.replace(tmp[name], out_dir / name)
    finally:  # interrupted or failed: leave no temporary files behind
        for path in tmp.values():
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading back

def load_meta(data_dir):
    """meta.json of a prepared directory; ValueError saying how to make one if there is none."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        out = "" if Path(data_dir) == Path(DEFAULT_OUT) else f" --out {data_dir}"
        raise ValueError(f"no prepared data in {data_dir}/ (meta.json missing): run "
                         f"`python prepare.py{out}` first")
    return json.loads(path.read_text())


def load_split(data_dir, split):
    """(tokens, offsets) of a split: a read-only memmap of ids and the int64 document starts."""
    meta = load_meta(data_dir)
    tokens = np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")
    offsets = np.load(Path(data_dir) / f"{split}_offsets.npy")
    if offsets[-1] != len(tokens):
        raise ValueError(f"{data_dir}: {split}.bin has {len(tokens)} tokens, offsets say "
                         f"{offsets[-1]}")
    return tokens, offsets


def split_files(data_dir):
    """(train files, val files) of a prepared directory, each in file order: the corpus is listed
    and read again as prepare.py did, val is meta.json's val_files, and the result must match
    meta.json's document and character counts. ValueError, one line, when it cannot be
    reproduced (a directory prepared by an older prepare.py: run it again)."""
    meta = load_meta(data_dir)
    source = meta["source"]
    if "val_files" not in meta:
        raise ValueError(f"{data_dir} was prepared by an older prepare.py (no val_files in its "
                         "meta.json): run prepare.py again")
    try:
        if meta["inputs"]:
            files = input_files(meta["inputs"])
        else:
            files, now = stdlib_files()
            if now != source:
                raise ValueError(f"{data_dir} was prepared from {source}, this Python's is {now}")
    except FileNotFoundError as e:
        raise ValueError(f"cannot list the corpus of {data_dir} again: {e}")
    docs, paths, _ = read_documents(files)
    val_paths = {os.path.join(meta["root"], f) for f in meta["val_files"]}
    val = {i for i, p in enumerate(paths) if os.path.abspath(p) in val_paths}
    for split, members in (("train", set(range(len(docs))) - val), ("val", val)):
        found = {"docs": len(members), "chars": sum(len(docs[i]) for i in members)}
        want = {k: meta["splits"][split][k] for k in found}
        if found != want:
            raise ValueError(f"cannot reproduce the {split} split of {data_dir}: the corpus "
                             f"({source}) now gives {found}, meta.json says {want}; "
                             f"run prepare.py again")
    return ([p for i, p in enumerate(paths) if i not in val],
            [p for i, p in enumerate(paths) if i in val])


# ----------------------------------------------------------------------------- main

def get_args(argv):
    parser = argparse.ArgumentParser(prog="prepare.py", description="Turn a text/code corpus "
                                     "into token files for train.py. Default corpus: the *.py "
                                     "sources of this Python's standard library.")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="files, directories (recursed, hidden entries skipped) or globs; "
                        "one document per file")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="output directory (default: %(default)s)")
    parser.add_argument("--tokenizer", metavar="FILE",
                        help="reuse this tokenizer.json instead of training one")
    parser.add_argument("--vocab_size", type=int, default=8192,
                        help="vocabulary of the trained tokenizer, a multiple of 64 "
                        "(default: %(default)s)")
    parser.add_argument("--val_fraction", type=float, default=VAL_FRACTION,
                        help="share of the corpus (in characters) held out for val "
                        "(default: %(default)s)")
    parser.add_argument("--val_chars", type=int, default=VAL_CHARS,
                        help="but never more than this many characters, ~300k tokens of code "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1337,
                        help="seed of the train/val split (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.vocab_size % 64 or args.vocab_size < 320:
        parser.error(f"--vocab_size must be a multiple of 64 and at least 320, "
                     f"got {args.vocab_size}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.val_chars < 1:
        parser.error(f"--val_chars must be at least 1, got {args.val_chars}")
    return args


def main(argv=None):
    args = get_args(argv)
    try:
        tok = tokenizer_to_reuse(args.tokenizer) if args.tokenizer else None  # before reading
    except ValueError as e:
        fail(e)
    try:
        files, source = ((input_files(args.input), " ".join(args.input)) if args.input
                         else stdlib_files())
    except FileNotFoundError as e:
        fail(f"{e}")
    looked_at = f"{len(files)} files from {source}"
    if not files:
        fail(f"no input files in {source}")
    docs, paths, skipped = read_documents(files)
    if len(docs) < 2:
        fail(f"need at least 2 non-empty UTF-8 documents to split into train "
                 f"and val, found {len(docs)} in {looked_at} ({skipped['empty']} empty, "
                 f"{skipped['undecodable']} undecodable)")
    val = val_indices([len(d) for d in docs], args.val_fraction, args.val_chars, args.seed)
    train_docs = [d for i, d in enumerate(docs) if i not in val]
    val_docs = [d for i, d in enumerate(docs) if i in val]
    # Which files are val, so that later scripts (finetune.py) can keep off what pretraining saw.
    root = os.path.commonpath([os.path.abspath(p.parent) for p in paths])
    val_files = [Path(os.path.abspath(paths[i])).relative_to(root).as_posix() for i in sorted(val)]

    tok = tok or train_tokenizer(train_docs, args.vocab_size)
    special_ids = check_tokenizer(tok)
    tokenizer_vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    dtype = np.uint16 if tokenizer_vocab_size <= 2**16 else np.uint32
    outputs = {"tokenizer.json": tok.to_str(pretty=True)}
    meta = {"vocab_size": -(-tokenizer_vocab_size // 64) * 64,  # rounded up for the embedding
            "tokenizer_vocab_size": tokenizer_vocab_size, "dtype": np.dtype(dtype).name,
            **special_ids, "splits": {}, "files": len(files),
            "skipped_files": sum(skipped.values()), "skipped": skipped, "source": source,
            "tokenizer": args.tokenizer or "trained", "seed": args.seed, "inputs": args.input,
            "val_fraction": args.val_fraction, "val_chars": args.val_chars, "root": root,
            "val_files": val_files}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens, offsets = encode_documents(tok, split_docs, dtype, desc=f"tokenizing {split}")
        outputs[f"{split}.bin"], outputs[f"{split}_offsets.npy"] = tokens, offsets
        meta["splits"][split] = {"docs": len(split_docs), "tokens": len(tokens),
                                 "chars": sum(map(len, split_docs))}
    outputs["meta.json"] = json.dumps(meta, indent=2) + "\n"
    write_outputs(Path(args.out), outputs)
    print(f"{looked_at}: {len(docs)} documents, {meta['skipped_files']} skipped; "
          f"train {meta['splits']['train']['tokens']:,} tokens, "
          f"val {meta['splits']['val']['tokens']:,} tokens, "
          f"vocab {tokenizer_vocab_size} -> {args.out}/")
    return meta


if __name__ == "__main__":
    main()
