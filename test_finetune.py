"""
finetune.py and sample.py --search against independent references: sentence-transformers' own
MultipleNegativesRankingLoss, metrics worked out by hand, Python's ast for what a document
still holds, and each text embedded alone. A small corpus, a tiny tokenizer and a tiny model
are built here; nothing is downloaded.
"""
import ast
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import codesearch
import finetune
import prepare
import runtime
import sample
from modernbert import ModernBERT, config_for

HERE = os.path.dirname(os.path.abspath(__file__))

TRICKY = '''\
import functools

def plain(a, b):
    """Add two numbers together.

    A second paragraph, which is not part of the query.
    """
    return a + b

@functools.lru_cache()
def decorated(n):
    \'\'\'Compute the naïve factorial of n.\'\'\'
    return 1 if n < 2 else n * decorated(n - 1)

class Box:
    """A class docstring, which is no pair."""
    def method(self):
        """Return the content of the box."""
        def inner():
            """Hand back the box itself, from inside."""
            return self
        return inner()

async def fetch(url):
    """Fetch a url asynchronously from the web."""
    return await url

def only_doc():
    """Nothing but a docstring here at all."""

def no_doc(x):
    return x
'''


def corpus_file(i):
    """A module of three functions whose docstrings and code share words, as real code does."""
    verbs = ["parse", "render", "merge", "split", "count", "load", "store", "sort", "scan", "wrap",
             "send", "read"]
    nouns = ["header", "table", "record", "token", "buffer", "config", "socket", "path", "stream",
             "cache"]
    funcs = []
    for j in range(3):
        verb, noun = verbs[(i + j) % len(verbs)], nouns[(3 * i + j) % len(nouns)]
        funcs.append(f'def {verb}_{noun}_{i}_{j}({noun}, limit={i + j}):\n'
                     f'    """{verb.capitalize()} the {noun} number {i} and {j} '
                     f'within a limit."""\n'
                     f'    result = [{noun}.{verb}() for _ in range(limit)]\n'
                     f'    return result[:{j + 1}]\n')
    return "\n\n".join(funcs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, train_tokenizer, save_checkpoint):
    """A prepared corpus of 16 files (3 functions each) and a tiny random model in our format."""
    root = tmp_path_factory.mktemp("ft")
    (root / "code").mkdir()
    for i in range(16):
        (root / "code" / f"mod{i:02d}.py").write_text(corpus_file(i))
    prepare.main(["--input", str(root / "code"), "--out", str(root / "data"), "--vocab_size", "384",
                  "--val_fraction", "0.25"])
    tokenizer = train_tokenizer([corpus_file(i) for i in range(16)] + [TRICKY], vocab_size=384)
    torch.manual_seed(0)
    model = ModernBERT(config_for("tiny", vocab_size=448, cls_id=0, sep_id=1, pad_id=2,
                                  init_std=0.2)).eval()
    save_checkpoint(model, root / "run" / "phase1", tokenizer, prefix="")
    return {"root": root, "data": str(root / "data"),
            "ckpt": str(root / "run" / "phase1" / "ckpt.pt"),
            "model": model, "tokenizer": tokenizer}


# ----------------------------------------------------------------------------- loss and metrics

def test_loss_equals_sentence_transformers_mnrl():
    losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    torch.manual_seed(0)
    queries, docs = torch.randn(8, 16), torch.randn(8, 16)
    for temperature in (0.05, 0.5):
        want = losses.MultipleNegativesRankingLoss(
            None, scale=1 / temperature).compute_loss_from_embeddings([queries, docs], None)
        torch.testing.assert_close(finetune.info_nce(queries, docs, temperature), want)


def test_metrics_equal_a_hand_computed_example():
    # Gold is the diagonal. Row 0: best of all -> rank 1. Row 1: 0.3 beats it and 0.2 ties it
    # -> 3 (ties count against the gold). Row 2: all zero, as BM25 scores a query with no shared
    # word -> 3.
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.2, 0.2], [0.0, 0.0, 0.0]])
    assert codesearch.gold_ranks(scores).tolist() == [1, 3, 3]
    m = codesearch.retrieval_metrics(torch.tensor([1, 2, 4, 11, 3]))
    assert m["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 0 + 1 / 3) / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / 1.5849625007 + 1 / 2.3219280949 + 0 + 1 / 2) / 5)
    assert m["R@1"] == pytest.approx(1 / 5) and m["R@10"] == pytest.approx(4 / 5)


def test_bm25_words_split_identifiers():
    assert codesearch.code_words("def read_file(HTTPServer, maxSize2): return the data") == [
        "def", "read", "file", "http", "server", "max", "size", "2", "return", "data"]


# ----------------------------------------------------------------------------- pairs

def test_docstrings_are_absent_from_every_document(tmp_path):
    (tmp_path / "tricky.py").write_text(TRICKY)
    (tmp_path / "py2.py").write_text('def old(x):\n    """Print it the old way, please."""\n'
                                     '    print x\n')
    pairs, counts = finetune.file_pairs([tmp_path / "tricky.py", tmp_path / "py2.py"], tmp_path, 3,
                                        desc=None)
    by_name = {p["name"]: p for p in pairs}
    assert sorted(by_name) == ["decorated", "fetch", "inner", "method", "plain"]
    assert counts["only_docstring"] == 1 and counts["with_docstring"] == 6 and \
        counts["unparsable"] == 1
    assert by_name["plain"]["query"] == "Add two numbers together."
    assert by_name["decorated"]["code"].startswith("@functools.lru_cache()\ndef decorated(n):\n")
    for p in pairs:
        tree = ast.parse(p["code"])  # still valid Python, dedented
        holders = [n for n in ast.walk(tree)
                   if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        assert holders and all(ast.get_docstring(n) is None for n in holders), p["name"]
        assert p["query"] not in p["code"] and '"""' not in p["code"] and "'''" not in p["code"]
    assert "return inner()" in by_name["method"]["code"] and \
        "Hand back" not in by_name["method"]["code"]


def test_train_and_test_pairs_come_from_disjoint_files(setup, tmp_path):
    meta = json.loads(open(os.path.join(setup["data"], "meta.json")).read())
    train, test = finetune.load_pairs(setup["data"], 3)
    train_files, test_files = {p["file"] for p in train}, {p["file"] for p in test}
    assert not train_files & test_files
    assert sorted(test_files) == sorted(meta["val_files"]) and len(test_files) >= 2
    assert len(train) + len(test) == 16 * 3
    # A directory prepared before val_files was recorded is refused with what to do, not guessed.
    old = tmp_path / "old"
    shutil.copytree(setup["data"], old)
    stripped = {k: v for k, v in meta.items() if k != "val_files"}
    (old / "meta.json").write_text(json.dumps(stripped))
    with pytest.raises(ValueError, match="older prepare.py .*run prepare.py again"):
        prepare.split_files(old)
    with pytest.raises(SystemExit, match="finetune.py: error: .*older prepare.py"):
        finetune.main(["--init_from", setup["ckpt"], "--data", str(old),
                       "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- embeddings

@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_packed_embeddings_equal_one_text_at_a_time(setup, pool):
    model, tokenizer = setup["model"], setup["tokenizer"]
    texts = [corpus_file(i) for i in range(6)] + ["x", "Return the content of the box."]
    packed = runtime.embed(model, tokenizer, texts, max_tokens=96, pool=pool)
    sep = tokenizer.token_to_id("[SEP]")
    with torch.no_grad():
        for text, row in zip(texts, packed):
            ids = runtime.truncated(runtime.encode(tokenizer, [text]), 96, sep)[0]
            states = model.encode(torch.tensor([ids]))[0]  # (len, d_model), padded path
            torch.testing.assert_close(row, states.mean(0) if pool == "mean" else states[0],
                                       atol=1e-5, rtol=0)
    assert runtime.truncated(runtime.encode(tokenizer, texts), 96, sep)[0][-1] == sep


# ----------------------------------------------------------------------------- the run

def test_finetune_runs_resumes_exactly_and_exports(setup, tmp_path, monkeypatch):
    train, _ = finetune.load_pairs(setup["data"], 3)
    s = {**finetune.DEFAULTS, "steps": 4, "batch_size": 4, "max_doc_tokens": 48}
    model, tokenizer, _ = runtime.load_model(setup["ckpt"], "cpu")
    saved = []
    real_save = finetune.save_atomic
    monkeypatch.setattr(finetune, "save_atomic",
                        lambda path, state: (saved.append(copy.deepcopy(state)),
                                             real_save(path, state)))
    tok_file = os.path.join(os.path.dirname(setup["ckpt"]), "tokenizer.json")
    finetune.finetune(model, tokenizer, train, s, str(tmp_path), None, False, setup["ckpt"],
                      tok_file, ckpt_every=2)
    assert [c["step"] for c in saved] == [2, 4] and saved[-1]["finished"]
    assert not torch.equal(saved[-1]["model"]["layers.0.attn.Wqkv.weight"],
                           setup["model"].layers[0].attn.Wqkv.weight)
    # From the step-2 checkpoint, a fresh model reaches the same weights.
    again, _, _ = runtime.load_model(setup["ckpt"], "cpu")
    finetune.finetune(again, tokenizer, train, s, str(tmp_path / "again"), saved[0], False,
                      setup["ckpt"], tok_file, 2)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, atol=0, rtol=0)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["finished"]
    exported = ModernBERT.from_pretrained(str(tmp_path / "hf"))
    torch.testing.assert_close(exported.state_dict(), model.state_dict())
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json") and \
        os.path.exists(tmp_path / "tokenizer.json")


def test_main_prints_the_table(setup, tmp_path, capsys):
    out = tmp_path / "ft"
    rows = finetune.main(["--init_from", setup["ckpt"], "--data", setup["data"], "--out", str(out),
                          "--steps", "2", "--batch_size", "4", "--max_doc_tokens", "48",
                          "--dtype", "fp32"])
    assert [r["name"] for r in rows] == \
        ["BM25", f"{setup['ckpt']} zero-shot", f"{setup['ckpt']} fine-tuned"]
    printed = capsys.readouterr().out
    assert "| BM25 |" in printed and \
        "| model | MRR@10 | NDCG@10 | Recall@1 | Recall@10 | seconds |" in printed
    assert json.loads((out / "results.json").read_text())["rows"][2]["metrics"] == \
        rows[2]["metrics"]
    # The fine-tuned model is a model sample.py loads; --resume of a finished run only evaluates.
    runtime.load_model(str(out), "cpu")
    again = finetune.main(["--init_from", setup["ckpt"], "--data", setup["data"], "--out", str(out),
                           "--resume", "--dtype", "fp32"])
    assert again[2]["metrics"] == rows[2]["metrics"]


# ----------------------------------------------------------------------------- code search

def test_search_finds_a_planted_function_and_caches(setup, tmp_path, monkeypatch):
    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    for i in range(5):
        (code / "pkg" / f"mod{i}.py").write_text(corpus_file(i))
    (code / "pkg" / "io_helpers.py").write_text(
        "import os\n\n\ndef slurp(path):\n"
        "    \"\"\"Read the whole file and return its contents.\"\"\"\n"
        "    with open(path) as f:\n        return f.read()\n")
    cache = tmp_path / "cache.pt"
    argv = ["--init_from", setup["ckpt"], "--search", "read the whole file and return its contents",
            "--in", str(code), "--cache", str(cache), "--top_k", "3"]
    hits = sample.main(argv)
    assert hits[0][1:] == (os.path.relpath(code / "pkg" / "io_helpers.py"), 4, "slurp")
    assert len(hits) == 3 and hits[0][0] > hits[1][0]
    calls = []
    real = codesearch.embed
    monkeypatch.setattr(codesearch, "embed",
                        lambda model, tok, texts, *a, **k: (calls.append(len(texts)),
                                                            real(model, tok, texts, *a, **k))[1])
    # only the query: every file came from the cache
    assert sample.main(argv) == hits and calls == [1]
    (code / "pkg" / "mod0.py").write_text(corpus_file(0) + "\n\ndef extra():\n    return 1\n")
    sample.main(argv)
    assert calls[1:] == [4, 1]  # the changed file's functions again, then the query


# ----------------------------------------------------------------------------- bad input

def finetune_error(argv):
    with pytest.raises(SystemExit) as e:
        finetune.main(argv)
    assert isinstance(e.value.code, str) and \
        e.value.code.startswith("finetune.py: error: "), e.value.code
    assert "\n" not in e.value.code
    return e.value.code


def test_errors_are_one_line_and_write_nothing(setup, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--init_from", setup["ckpt"], "--data", setup["data"], "--out", str(out)]
    for flag, value in [("--temperature", "0"), ("--batch_size", "1"), ("--steps", "0"),
                        ("--lr", "-1"), ("--warmup", "1"), ("--max_doc_tokens", "2"),
                        ("--lr", "nan")]:
        with pytest.raises(SystemExit) as e:
            finetune.main(base + [flag, value])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(
            f"finetune.py: error: {flag} must be")
    # A corpus with functions but no docstrings: no pairs.
    (tmp_path / "bare").mkdir()
    for i in range(4):
        (tmp_path / "bare" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    prepare.main(["--input", str(tmp_path / "bare"), "--out", str(tmp_path / "bare_data"),
                  "--vocab_size", "320"])
    assert "no docstring pairs in the train split" in \
        finetune_error(["--init_from", setup["ckpt"], "--data", str(tmp_path / "bare_data"),
                        "--out", str(out)])
    assert "no docstring pairs" in finetune_error(base + ["--min_query_words", "1000"])
    assert "does not exist" in finetune_error(base[:1] + ["nowhere/ckpt.pt"] + base[2:])
    assert "meta.json missing): run `python prepare.py --out" in \
        finetune_error(base[:2] + ["--data", str(tmp_path), "--out", str(out)])
    assert not out.exists()
    # sample.py --search: a wrong --in, a directory with no functions; no cache written.
    cache = tmp_path / "cache.pt"
    for where, message in [(tmp_path / "nowhere", "cannot read --in"),
                           (tmp_path / "bare_data", "no Python functions in the 0 *.py files")]:
        with pytest.raises(SystemExit) as e:
            sample.main(["--init_from", setup["ckpt"], "--search", "x", "--in", str(where),
                         "--cache", str(cache)])
        assert e.value.code.startswith("sample.py: error: ") and message in e.value.code
    assert not cache.exists()


def test_cli_error_exits_nonzero_without_a_traceback(setup, tmp_path):
    run = subprocess.run([sys.executable, os.path.join(HERE, "finetune.py"),
                          "--init_from", setup["ckpt"], "--data", str(tmp_path / "none"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and not (tmp_path / "out").exists()
    assert run.stderr.strip().splitlines() == [
        f"finetune.py: error: no prepared data in {tmp_path / 'none'}/ "
        "(meta.json missing): run `python prepare.py --out "
        f"{tmp_path / 'none'}` first"]
