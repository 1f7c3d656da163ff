"""
finetune.py and sample.py --search against independent references: sentence-transformers' own
MultipleNegativesRankingLoss, metrics worked out by hand, Python's ast for what a document
still holds, and each text embedded alone. A small corpus, a tiny tokenizer and a tiny model
are built here; nothing is downloaded.
"""
import ast
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
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
    # Hard negatives (more documents than queries), and the symmetric loss: the query -> function
    # and function -> query cross-entropies averaged, as sentence-transformers' per_direction mode.
    hard = torch.randn(8, 16)
    want = losses.MultipleNegativesRankingLoss(None, scale=20.0).compute_loss_from_embeddings(
        [queries, docs, hard], None)
    torch.testing.assert_close(finetune.info_nce(queries, torch.cat([docs, hard]), 0.05), want)
    both = losses.MultipleNegativesRankingLoss(None, scale=20.0,
                                               directions=("query_to_doc", "doc_to_query"),
                                               partition_mode="per_direction")
    for extra in ([], [hard]):
        want = both.compute_loss_from_embeddings([queries, docs, *extra], None)
        torch.testing.assert_close(finetune.info_nce(queries, torch.cat([docs, *extra]), 0.05,
                                                     symmetric=True), want)


def test_metrics_equal_a_hand_computed_example():
    # Gold is the diagonal. Row 0: best of all -> rank 1. Row 1: 0.3 beats it, 0.2 ties it -> 2
    # or 3 at random. Row 2: all zero, as BM25 scores a query with no shared word -> 1, 2 or 3.
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.2, 0.2], [0.0, 0.0, 0.0]])
    seen = torch.stack([codesearch.gold_ranks(scores, seed=s) for s in range(3000)])
    assert (seen[:, 0] == 1).all() and set(seen[:, 1].tolist()) == {2, 3}
    assert set(seen[:, 2].tolist()) == {1, 2, 3}
    # uniform among the tied places: mean rank 2.5 and 2 (binomial sd of the mean < 0.015)
    assert seen[:, 1].double().mean().item() == pytest.approx(2.5, abs=0.05)
    assert seen[:, 2].double().mean().item() == pytest.approx(2.0, abs=0.05)
    assert torch.equal(codesearch.gold_ranks(scores, seed=7), codesearch.gold_ranks(scores, seed=7))
    m = codesearch.retrieval_metrics(torch.tensor([1, 2, 4, 11, 3]))
    assert m["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 0 + 1 / 3) / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / 1.5849625007 + 1 / 2.3219280949 + 0 + 1 / 2) / 5)
    assert m["R@1"] == pytest.approx(1 / 5) and m["R@10"] == pytest.approx(4 / 5)


def test_fusion_equals_a_hand_worked_example():
    # Two systems over 3 candidates for one query. BM25 ranks (c0, c2 tied, c1): ranks 1, 3, 1 ->
    # competition ranks, tied candidates share the best. Dense ranks c1, c2, c0: ranks 3, 1, 2.
    bm25 = torch.tensor([[2.0, 0.5, 2.0]])
    dense = torch.tensor([[0.1, 0.9, 0.4]])
    assert codesearch.candidate_ranks(bm25).tolist() == [[1, 3, 1]]
    assert codesearch.candidate_ranks(dense).tolist() == [[3, 1, 2]]
    fused = codesearch.reciprocal_rank_fusion([bm25, dense], k=60)
    want = [1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 1 / 61 + 1 / 62]
    torch.testing.assert_close(fused, torch.tensor([want], dtype=torch.float64))
    assert fused[0].argmax().item() == 2  # in both systems' top two: first after fusion
    # Weighted: z-scores per row. BM25 (2, .5, 2): mean 1.5, sd sqrt(0.75); dense (.1, .9, .4):
    # mean 0.4667, sd 0.4041.
    z_bm25 = (torch.tensor([2.0, 0.5, 2.0]) - 1.5) / 0.75 ** 0.5
    z_dense = (dense[0] - dense[0].mean()) / dense[0].std()
    torch.testing.assert_close(codesearch.weighted_fusion(bm25, dense, 0.3)[0],
                               (0.3 * z_bm25 + 0.7 * z_dense).double())
    assert codesearch.standardized(torch.zeros(1, 4)).abs().max() == 0  # an all-tied row: 0


def test_seeds_table_by_hand(tmp_path, capsys):
    """Two seeds of a model against two of another: the mean and t interval over seeds, and the
    paired bootstrap of the per-query reciprocal rank averaged over seeds, as worked here."""
    def run(name, model_ranks):
        rows = [{"name": "BM25", "sets": {"stdlib": {"ranks": [1, 2, 4, 20]}}},
                {"name": "dense", "sets": {"stdlib": {"ranks": model_ranks}}}]
        for row in rows:
            row["sets"]["stdlib"]["metrics"] = codesearch.retrieval_metrics(
                row["sets"]["stdlib"]["ranks"])
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"rows": rows}))
        return str(tmp_path / name)
    a = [run("a1", [1, 1, 2, 20]), run("a2", [1, 4, 1, 5])]
    b = [run("b1", [2, 20, 20, 1]), run("b2", [20, 20, 1, 2])]
    finetune.main(["--seeds_of", *a, "--against", *b])
    dense = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| dense")]
    cells = [c.strip() for c in dense[0].strip("|").split("|")]
    mrr = [(1 + 1 + 0.5 + 0) / 4, (1 + 0.25 + 1 + 0.2) / 4]           # 0.625, 0.6125
    half = 12.706 * np.std(mrr, ddof=1) / np.sqrt(2)                  # t(0.975, 1 df)
    assert cells[2] == f"{np.mean(mrr):.3f} ({np.mean(mrr) - half:.3f}-{np.mean(mrr) + half:.3f})"
    assert cells[3] == "0.625, 0.613"
    rr_a = np.mean([[1, 1, 0.5, 0], [1, 0.25, 1, 0.2]], axis=0)       # per query, seeds averaged
    vs_bm25 = rr_a - np.array([1, 0.5, 0.25, 0])
    vs_b = rr_a - np.mean([[0.5, 0, 0, 1], [0, 0, 1, 0.5]], axis=0)
    assert cells[4].startswith(f"{vs_bm25.mean():+.3f} (")
    assert cells[5].startswith(f"{vs_b.mean():+.3f} (")
    assert codesearch.paired_bootstrap(torch.tensor([[1, 1, 2, 20], [1, 4, 1, 5]]),
                                       torch.tensor([1, 2, 4, 20]))["diff"] == \
        pytest.approx(vs_bm25.mean())
    with pytest.raises(SystemExit, match="not score the same systems"):
        finetune.main(["--seeds_of", *a, "--against", run("short", [1, 2, 3])])
    with pytest.raises(SystemExit, match="finetune.py: error: .*results.json not found"):
        finetune.main(["--seeds_of", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        finetune.main(["--against", *b])
    assert "give both" in capsys.readouterr().err


def test_reranked_moves_the_top_k_above_the_rest_in_logit_order():
    first = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    top = torch.tensor([[0, 1, 2]])               # BM25's top 3
    out = codesearch.reranked(first, top, torch.tensor([[-1.0, 7.0, 0.5]]))
    assert out[0].argsort(descending=True).tolist() == [1, 2, 0, 3, 4]
    assert codesearch.gold_ranks(out.expand(5, 5)).tolist()[:1] == [3]  # gold 0: third now


def test_paired_bootstrap_matches_a_brute_force_resampling():
    a, b = torch.tensor([1, 2, 12, 3, 1, 5]), torch.tensor([2, 2, 1, 11, 4, 1])
    got = codesearch.paired_bootstrap(a, b, resamples=4000, seed=3)
    rr = lambda r: np.where(r.numpy() <= 10, 1 / r.numpy(), 0.0)
    diff = rr(a) - rr(b)
    assert got["diff"] == pytest.approx(diff.mean())
    picks = torch.randint(6, (4000, 6), generator=torch.Generator().manual_seed(3)).numpy()
    means = diff[picks].mean(1)
    assert (got["lo"], got["hi"]) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert got["lo"] < got["diff"] < got["hi"]
    same = codesearch.paired_bootstrap(a, a)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0}  # a system against itself


def test_hard_negatives_skip_the_gold_and_near_duplicates():
    pairs = [{"name": "read_file", "query": "Read the whole file.", "code": "def read_file(p): "
              "return open(p).read()"},
             {"name": "read_file", "query": "Read a file, an override.", "code": "def read_file"
              "(self, p): return self.fs.read(p)"},            # same name: an override
             {"name": "load", "query": "Read the whole file!", "code": "def load(q): pass"},
             {"name": "write_file", "query": "Write data to a file.", "code": "def write_file(p, "
              "d): open(p, 'w').write(d)"},
             {"name": "parse", "query": "Parse the tokens.", "code": "def parse(t): return t"}]
    scores = torch.tensor([[9., 8., 7., 6., 5.], [8., 9., 1., 2., 3.], [1., 2., 9., 3., 4.],
                           [5., 4., 3., 9., 2.], [1., 2., 3., 4., 9.]])
    found = codesearch.hard_negatives(scores, pairs, n=2)
    # 0: its own (0) and the override (1) and the same docstring (2) are out -> 3, 4
    assert found[0] == [3, 4]
    for i, negatives in enumerate(found):
        assert i not in negatives and len(set(negatives)) == len(negatives)
        assert all(not codesearch.near_duplicate(codesearch.fingerprint(pairs[i]),
                                                 codesearch.fingerprint(pairs[j]))
                   for j in negatives)
    assert found[1] == [4, 3]  # best first


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
    splits = finetune.load_pairs(setup["data"], 3)
    files = {name: {p["file"] for p in pairs} for name, pairs in splits.items()}
    assert not files["train"] & files["test"] and not files["dev"] & files["train"]
    assert not files["dev"] & files["test"] and len(files["dev"]) >= 1
    assert sorted(files["test"]) == sorted(meta["val_files"]) and len(files["test"]) >= 2
    assert sum(map(len, splits.values())) == 16 * 3
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

@pytest.mark.parametrize("hard", [0, 1])
def test_finetune_runs_resumes_exactly_and_exports(setup, tmp_path, monkeypatch, hard):
    train = finetune.load_pairs(setup["data"], 3)["train"]
    s = {**finetune.DEFAULTS, "steps": 4, "batch_size": 4, "max_doc_tokens": 48,
         "hard_negatives": hard, "loss": ["one-way", "symmetric"][hard]}
    negatives = finetune.mined_negatives(train, 3)
    model, tokenizer, _ = runtime.load_model(setup["ckpt"], "cpu")
    saved = []
    real_save = finetune.save_atomic
    monkeypatch.setattr(finetune, "save_atomic",
                        lambda path, state: (saved.append(copy.deepcopy(state)),
                                             real_save(path, state)))
    tok_file = os.path.join(os.path.dirname(setup["ckpt"]), "tokenizer.json")

    def run(model, out, resumed):
        finetune.finetune(model, finetune.bi_encoder_loss(model, tokenizer, train, s, negatives),
                          len(train), s, out, resumed, False, setup["ckpt"],
                          dataclasses.asdict(model.config), 2,
                          lambda: runtime.export_hf(model, out, tok_file, pooling="mean"))
    run(model, str(tmp_path), None)
    assert [c["step"] for c in saved] == [2, 4] and saved[-1]["finished"]
    assert not torch.equal(saved[-1]["model"]["layers.0.attn.Wqkv.weight"],
                           setup["model"].layers[0].attn.Wqkv.weight)
    # From the step-2 checkpoint, a fresh model reaches the same weights.
    again, _, _ = runtime.load_model(setup["ckpt"], "cpu")
    run(again, str(tmp_path / "again"), saved[0])
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, atol=0, rtol=0)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["finished"]
    exported = ModernBERT.from_pretrained(str(tmp_path / "hf"))
    torch.testing.assert_close(exported.state_dict(), model.state_dict())
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json")


def test_main_prints_the_table(setup, tmp_path, capsys):
    out = tmp_path / "ft"
    # The second test set from a small installed package (tqdm) in pools of 20; a reranker.
    argv = ["--init_from", setup["ckpt"], "--data", setup["data"], "--out", str(out),
            "--steps", "2", "--batch_size", "4", "--max_doc_tokens", "48", "--dtype", "fp32",
            "--packages", "tqdm", "--pool_size", "20", "--pools", "2", "--rerank_steps", "2",
            "--rerank_queries", "2", "--rerank_negatives", "2", "--rerank_top_k", "3"]
    rows = finetune.main(argv)
    c = setup["ckpt"]
    assert [r["name"] for r in rows] == [
        "BM25", f"{c} zero-shot", f"{c} fine-tuned",
        f"{c} fine-tuned + BM25, reciprocal rank fusion (k = 60)",
        f"{c} fine-tuned + BM25, weighted (BM25 weight {rows[4]['weights']['stdlib']:.1f} for "
        f"stdlib, {rows[4]['weights']['packages']:.1f} for packages, chosen on dev)",
        f"{c} cross-encoder over BM25's top 3"]
    printed = capsys.readouterr().out
    assert "| BM25 |" in printed and "| system | stdlib MRR@10 | stdlib vs BM25 (95%) |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["test_pairs"] == {"stdlib": 12, "packages": 40}
    assert results["packages_dev_pairs"] == 20  # the third pool: never scored, it picks a weight
    for name, grid in rows[4]["dev_grid"].items():  # each set's weight: its dev set's best
        assert rows[4]["weights"][name] == max(grid, key=grid.get)
    assert rows[4]["weight"] == rows[4]["weights"]["stdlib"]  # what sample.py's hybrid takes
    assert results["packages"]["tqdm"] and results["pool_size"] == {"stdlib": 12, "packages": 20}
    for saved, row in zip(results["rows"], rows):
        for name in ("stdlib", "packages"):
            ranks = torch.tensor(saved["sets"][name]["ranks"])
            assert len(ranks) == results["test_pairs"][name]
            assert ranks.min() >= 1 and ranks.max() <= results["pool_size"][name]
            # the metrics are those of the saved per-query ranks
            assert codesearch.retrieval_metrics(ranks) == pytest.approx(
                row["sets"][name]["metrics"])
    assert "paired" not in results["rows"][0] and \
        set(results["rows"][1]["paired"]) == {"stdlib", "packages"}
    # The reranker keeps BM25's order past its top 3, so its misses there are BM25's.
    bm25, rerank = (torch.tensor(results["rows"][i]["sets"]["stdlib"]["ranks"]) for i in (0, 5))
    assert torch.equal(rerank[bm25 > 3], bm25[bm25 > 3]) and (rerank[bm25 <= 3] <= 3).all()
    # The fine-tuned models are models sample.py and transformers load; --resume of a finished
    # run only evaluates.
    runtime.load_model(str(out), "cpu")
    transformers = pytest.importorskip("transformers")
    cross = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "rerank/hf"))
    assert cross.config.num_labels == 1
    again = finetune.main(["--init_from", setup["ckpt"], "--data", setup["data"], "--out", str(out),
                           "--resume", "--dtype", "fp32", "--packages", "tqdm", "--pool_size",
                           "20", "--pools", "2"])
    assert [r["sets"] for r in again] == [r["sets"] for r in rows]
    # sample.py --search --mode hybrid takes the weight this run chose on dev.
    assert sample.chosen_weight(str(out / "ckpt.pt")) == rows[4]["weight"]
    assert sample.chosen_weight(setup["ckpt"]) == sample.DEFAULT_BM25_WEIGHT  # no results.json
    # sample.py --search --mode rerank: BM25's top 3 of a folder, in the cross-encoder's order.
    code = tmp_path / "code"
    code.mkdir()
    for i in range(4):
        (code / f"mod{i}.py").write_text(corpus_file(i))
    query = "Parse the header number 0 and 0 within a limit."
    argv = ["--search", query, "--in", str(code), "--top_k", "5", "--cache", str(tmp_path / "c")]
    bm25 = sample.main(argv + ["--mode", "bm25", "--top_k", "50"])
    hits = sample.main(argv + ["--mode", "rerank", "--init_from", str(out)])
    third = bm25[2][0]  # BM25's top 3 (ties at the third score may go either way)
    assert {h[1:] for h in hits[:3]} <= {h[1:] for h in bm25 if h[0] >= third}
    assert [h[1:] for h in hits[3:]] == [h[1:] for h in bm25 if h[1:] not in
                                         {g[1:] for g in hits[:3]}][:2]
    assert [h[0] for h in hits] == sorted((h[0] for h in hits), reverse=True)
    with pytest.raises(SystemExit, match="no cross-encoder in .*--rerank_steps"):
        sample.main(argv + ["--mode", "rerank", "--init_from", str(tmp_path / "nothing")])


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
    slurp = (os.path.join("code", "pkg", "io_helpers.py"), 4, "slurp")  # from --in's parent
    for mode in ("bm25", "hybrid"):  # the planted function shares the query's words
        found = sample.main(argv + ["--mode", mode])
        assert found[0][1:] == slurp and found[0][0] > found[1][0], mode
    argv += ["--mode", "dense"]
    cache.unlink()
    hits = sample.main(argv)
    assert hits[0][1:] == slurp
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
