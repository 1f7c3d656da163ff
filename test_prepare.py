"""Tests of prepare.py on small corpora built in a temporary directory (a few seconds in all)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import prepare

OUTPUTS = {"tokenizer.json", "train.bin", "val.bin", "train_offsets.npy", "val_offsets.npy",
           "meta.json"}


def make_corpus(root):
    """A small corpus with the awkward cases, and the documents prepare.py should keep."""
    docs = {}
    for i in range(24):
        docs[f"pkg/mod{i:02d}.py"] = (
            f'"""Module {i}: helpers for the café ☕ and 日本語 text."""\n\n'
            f"def f{i}(x, y={i}):\n\tif x:\r\n        return x * {i}  # comment with  two spaces\n"
            f"    return [y] * {i}\n" * (1 + i % 5))
    docs["notes.txt"] = ("A literal [CLS] and [MASK] and [SEP] in a document are text, "
                         "not markers.\n")
    docs["no_newline.md"] = "  leading spaces, no final newline"
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))
    (root / "empty.py").write_text("")
    (root / "blank.py").write_text(" \n\t\n")
    (root / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))  # not UTF-8
    (root / "binary.dat").write_bytes(b"abc\x00def")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: not part of the corpus
    return docs


def run(corpus, out, *extra):
    return prepare.main(["--input", str(corpus), "--out", str(out), "--vocab_size", "512", *extra])


def decoded_documents(tok, out, meta):
    """Every stored document decoded, checking on the way that each is [CLS] ... [SEP]."""
    docs = []
    for split in ("train", "val"):
        tokens, offsets = prepare.load_split(out, split)
        assert tokens.dtype == np.dtype(meta["dtype"])
        assert offsets[0] == 0 and offsets[-1] == len(tokens) == meta["splits"][split]["tokens"]
        assert len(offsets) - 1 == meta["splits"][split]["docs"] > 0
        starts, ends = tokens[offsets[:-1]], tokens[offsets[1:] - 1]
        assert (starts == meta["cls_id"]).all() and (ends == meta["sep_id"]).all()
        # [CLS] and [SEP] appear nowhere else, even for documents that contain the text "[CLS]"
        assert (tokens == meta["cls_id"]).sum() == (tokens == meta["sep_id"]).sum() == \
            len(offsets) - 1
        docs += [tok.decode(tokens[a + 1:b - 1].tolist())
                 for a, b in zip(offsets[:-1], offsets[1:])]
    return docs


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    return root, make_corpus(root)


def test_round_trip_and_counts(corpus, tmp_path):
    root, docs = corpus
    meta = run(root, tmp_path / "out")
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert sorted(decoded_documents(tok, tmp_path / "out", meta)) == sorted(docs.values())
    assert meta == prepare.load_meta(tmp_path / "out")
    assert meta["files"] == len(docs) + 4  # the hidden .git/HEAD is not a file of the corpus
    assert meta["skipped"] == {"empty": 2, "undecodable": 2} and meta["skipped_files"] == 4
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "trained"
    assert meta["vocab_size"] % 64 == 0 and \
        0 <= meta["vocab_size"] - meta["tokenizer_vocab_size"] < 64
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUTPUTS


def test_special_ids_and_mask_lstrip(corpus, tmp_path):
    root, _ = corpus
    meta = run(root, tmp_path / "out")
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    ids = prepare.check_tokenizer(tok)
    assert ids == {k: meta[k] for k in ("cls_id", "sep_id", "pad_id", "mask_id", "unk_id")}
    assert len(set(ids.values())) == 5
    assert ids["mask_id"] == tok.token_to_id("[MASK]")
    # lstrip: the space before [MASK] belongs to the mask, so both texts give the same ids
    with_space, without = tok.encode("return x [MASK] y").ids, tok.encode("return x[MASK] y").ids
    assert with_space == without and ids["mask_id"] in with_space
    assert with_space[0] == ids["cls_id"] and with_space[-1] == ids["sep_id"]


def test_same_input_gives_identical_bytes(corpus, tmp_path):
    root, _ = corpus
    run(root, tmp_path / "a")
    run(root, tmp_path / "b")
    run(root, tmp_path / "b")  # over an existing output directory too
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_glob_input_and_val_size(corpus, tmp_path):
    root, docs = corpus
    meta = run(f"{root}/**/*.py", tmp_path / "out", "--val_fraction", "0.2")
    n_py = sum(name.endswith(".py") for name in docs)
    assert meta["files"] == n_py + 3  # empty.py, blank.py, latin1.py
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == n_py
    chars = meta["splits"]["train"]["chars"] + meta["splits"]["val"]["chars"]
    assert meta["splits"]["val"]["chars"] >= 0.2 * chars  # whole documents until the target is met


def test_split_train_val_is_seeded_and_keeps_train_nonempty():
    docs = [f"doc {i} " * (i + 1) for i in range(50)]
    a = prepare.split_train_val(docs, 0.1, 10**9, seed=1)
    assert a == prepare.split_train_val(docs, 0.1, 10**9, seed=1)
    assert a != prepare.split_train_val(docs, 0.1, 10**9, seed=2)
    assert sorted(a[0] + a[1]) == sorted(docs)
    assert sum(map(len, a[1])) >= 0.1 * sum(map(len, docs))
    train, val = prepare.split_train_val(docs, 0.99, 10**9, seed=1)
    assert len(train) == 1 and len(val) == 49
    train, val = prepare.split_train_val(docs, 0.5, 1, seed=1)  # the char cap wins: one document
    assert len(val) == 1


def test_reused_tokenizer_with_its_own_ids(corpus, tmp_path):
    """Like ModernBERT's tokenizer: special tokens at the end of the vocabulary."""
    root, docs = corpus
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs.values(), trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    n = tok.get_vocab_size()
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", n + 1), ("[SEP]", n + 2)])
    tok.save(str(tmp_path / "tok.json"))
    meta = run(root, tmp_path / "out", "--tokenizer", str(tmp_path / "tok.json"))
    assert (meta["unk_id"], meta["cls_id"], meta["sep_id"], meta["pad_id"], meta["mask_id"]) == \
        tuple(range(n, n + 5))
    assert meta["tokenizer"] == str(tmp_path / "tok.json") and meta["tokenizer_vocab_size"] == n + 5
    saved = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert saved.get_vocab(with_added_tokens=True) == tok.get_vocab(with_added_tokens=True)
    assert sorted(decoded_documents(saved, tmp_path / "out", meta)) == sorted(docs.values())


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)} | \
        {t: 70_000 + i for i, t in enumerate(prepare.SPECIAL_TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 70_000), ("[SEP]", 70_001)])
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("w69999 w1")
    (tmp_path / "in" / "b.txt").write_text("w66000 nope")
    meta = run(tmp_path / "in", tmp_path / "out", "--tokenizer", str(tmp_path / "tok.json"))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_016
    tokens = np.concatenate([prepare.load_split(tmp_path / "out", s)[0] for s in ("train", "val")])
    assert sorted(tokens.tolist()) == \
        sorted([70_000, 69_999, 1, 70_001, 70_000, 66_000, 70_004, 70_001])


# ----------------------------------------------------------------------------- errors

def error_of(argv):
    with pytest.raises(SystemExit) as e:
        prepare.main(argv)
    return str(e.value)


def test_no_usable_input_is_a_clear_error(tmp_path):
    (tmp_path / "nothing").mkdir()
    msg = error_of(["--input", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert msg.startswith("prepare.py: error: no input files") and str(tmp_path / "nothing") in msg
    msg = error_of(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")])
    assert "no such file" in msg and "missing.txt" in msg
    msg = error_of(["--input", str(tmp_path / "*.nope"), "--out", str(tmp_path / "out")])
    assert "matches" in msg and "*.nope" in msg
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_text("")
    (bad / "latin1.txt").write_bytes(b"caf\xe9")
    msg = error_of(["--input", str(bad), "--out", str(tmp_path / "out")])
    assert "found 0" in msg and "1 empty, 1 undecodable" in msg and str(bad) in msg
    assert not (tmp_path / "out").exists()  # nothing written


def test_error_exit_code_and_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = subprocess.run([sys.executable, "prepare.py", "--input", str(tmp_path / "empty.txt"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       cwd=Path(prepare.__file__).parent)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("prepare.py: error: need at least 2")


def test_bad_tokenizer_is_a_clear_error(corpus, tmp_path):
    root, _ = corpus
    argv = ["--input", str(root), "--out", str(tmp_path / "out"), "--tokenizer"]
    msg = error_of(argv + [str(tmp_path / "absent.json")])
    assert "cannot load tokenizer" in msg and "absent.json" in msg
    tok = Tokenizer(models.WordLevel({"a": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3},
                                     unk_token="[PAD]"))
    tok.save(str(tmp_path / "few.json"))
    msg = error_of(argv + [str(tmp_path / "few.json")])
    assert msg.endswith("lacks the special tokens [MASK], [UNK]")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(prepare.SPECIAL_TOKENS)},
                                     unk_token="[UNK]"))
    tok.save(str(tmp_path / "unwrapped.json"))  # all tokens, but no post-processor
    assert "[CLS] ... [SEP]" in error_of(argv + [str(tmp_path / "unwrapped.json")])
    assert not (tmp_path / "out").exists()


def test_bad_vocab_size_is_rejected(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", str(root), "--vocab_size", "1000"])
    assert e.value.code == 2  # argparse's usage error


def test_interrupted_write_leaves_no_complete_looking_output(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    out = tmp_path / "out"
    run(root, out)
    replaced = []

    def interrupted_replace(src, dst):
        if replaced:
            raise KeyboardInterrupt
        replaced.append(dst)
        return prepare.os.rename(src, dst)

    monkeypatch.setattr(prepare.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        run(root, out, "--seed", "7")
    assert not list(out.glob("*.tmp"))  # temporary files cleaned up
    with pytest.raises(ValueError,
                       match="meta.json missing.*run `python prepare.py --out .*` first"):
        prepare.load_meta(out)  # the old meta.json no longer vouches for a mixed directory


def test_default_corpus_is_the_stdlib():
    files, source = prepare.stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert any(f.name == "argparse.py" for f in files) and "stdlib" in source
