"""
Code search, shared by finetune.py (which trains and measures it) and sample.py --search (which
uses it): the functions of a Python source, BM25 over identifiers split into words, a model's
ranking of functions for a query, and the metrics CodeSearchNet reports.
"""
import ast
import os
import re
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from modernbert import Config, ModernBERT
from runtime import (Classifier, autocast_for, embed, encode, load_checkpoint, model_tokenizer,
                     pick_device, quiet_encoder, save_atomic, token_budget_runs, truncated)

# How much of a query and of a function the dense model reads (finetune.py's defaults).
MAX_QUERY_TOKENS, MAX_DOC_TOKENS = 64, 256

# ----------------------------------------------------------------------------- functions of a file

DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)  # what can hold a docstring


def definitions(node):
    """Every class and function inside node, outermost first. Only statement lists are visited
    (a def is a statement), which is several times faster than ast.walk over every expression."""
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, []):
            if isinstance(child, DEFINITIONS):
                yield child
            yield from definitions(child)


def is_docstring(statement):
    return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str))


def code_functions(text, strip_docstrings=False):
    """Every function and method of a Python source, in order: dicts with "name", "line" (of the
    def, or its first decorator), "docstring" (cleaned, None if it has none), "body" (statements
    after the docstring) and "code" (the source, dedented; with strip_docstrings, every docstring
    inside it, nested ones too, is cut out). None for a file that does not parse (the stdlib's
    test data holds some Python 2)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    lines = [line.encode() for line in text.splitlines(keepends=True)]  # columns count UTF-8 bytes
    found = []
    for node in definitions(tree):
        if isinstance(node, ast.ClassDef):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        code = lines[first - 1:node.end_lineno]
        if strip_docstrings:
            inner = [n.body[0] for n in [node, *definitions(node)] if is_docstring(n.body[0])]
            code = cut(code, first, inner)
        docstring = ast.get_docstring(node)
        found.append({"name": node.name, "line": first, "docstring": docstring,
                      "body": len(node.body) - (docstring is not None),
                      "code": textwrap.dedent(b"".join(code).decode())})
    return sorted(found, key=lambda f: f["line"])


def cut(code, first, nodes):
    """code (byte lines from line `first` on) without the source spans of nodes; lines left
    holding only whitespace go too."""
    code = list(code)
    for node in sorted(nodes, key=lambda n: n.lineno, reverse=True):  # bottom up: lines hold
        a, b = node.lineno - first, node.end_lineno - first
        code[a:b + 1] = [code[a][:node.col_offset] + code[b][node.end_col_offset:]]
        if not code[a].strip():
            del code[a]
    return code


# ----------------------------------------------------------------------------- BM25

# HTTPServer -> HTTP Server; read_file -> read file
WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def code_words(text):
    """Lower-cased words with identifiers split at underscores and case changes, stopwords out."""
    from bm25s.stopwords import STOPWORDS_EN
    return [w for w in (m.lower() for m in WORD.findall(text)) if w not in STOPWORDS_EN]


def bm25_scores(queries, docs, progress=True):
    """(n_queries, n_docs) BM25 scores (bm25s, its default Lucene variant, k1 1.5, b 0.75)."""
    import bm25s  # only here: loading it takes a moment that a dense search does not need
    index = bm25s.BM25()
    index.index([code_words(d) or ["<empty>"] for d in docs], show_progress=False)
    return np.stack([index.get_scores(code_words(q)) for q in tqdm(queries, desc="BM25",
                                                                   leave=False,
                                                                   disable=not progress)])


# ----------------------------------------------------------------------------- ranks and metrics

def gold_ranks(scores, seed=0):
    """1-based rank of each query's own document (the diagonal) among all candidates, ties broken
    at random (seeded): the gold lands anywhere among the candidates that score the same. A query
    BM25 scores 0 everywhere (no shared word) gets a random rank, as a random ranking would."""
    scores = torch.as_tensor(scores)                                       # (n_queries, n_docs)
    gold = scores.diagonal()[:, None]
    higher, tied = (scores > gold).sum(1), (scores == gold).sum(1) - 1     # tied: others only
    u = torch.rand(len(scores), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return higher + 1 + (u * (tied + 1)).long()


def candidate_ranks(scores):
    """(n_queries, n_docs) 1-based rank of every candidate in each query's ordering; tied
    candidates share the best of their ranks (1 + how many score strictly higher)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    ordered = scores.sort(1, descending=True).values                       # (n_queries, n_docs)
    # how many score strictly higher = where the candidate's score would go in -ordered
    return torch.searchsorted(-ordered.contiguous(), -scores.contiguous(), right=False) + 1


def reciprocal_rank_fusion(score_matrices, k=60):
    """Reciprocal rank fusion (Cormack, Clarke and Buettcher 2009): a candidate scores
    sum over systems of 1 / (k + its rank in that system). Ranks, not scores, so BM25's unbounded
    scores and the model's cosines need no common scale; k = 60 damps the top ranks' lead."""
    return sum(1.0 / (k + candidate_ranks(s).double()) for s in score_matrices)


def standardized(scores):
    """Each query's scores minus their mean, over their standard deviation (all-equal rows -> 0)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    return (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-12)


def weighted_fusion(bm25, dense, weight):
    """weight * BM25 + (1 - weight) * dense, each standardized per query first."""
    return weight * standardized(bm25) + (1 - weight) * standardized(dense)


def retrieval_metrics(ranks):
    """With one relevant document per query: MRR@10 = mean 1/rank (0 past 10), NDCG@10 = mean
    1/log2(rank + 1) (ideal DCG is 1), Recall@k = share found in the top k."""
    r = torch.as_tensor(ranks).double()
    top10 = (r <= 10).double()
    return {"MRR@10": (top10 / r).mean().item(),
            "NDCG@10": (top10 / torch.log2(r + 1)).mean().item(),
            "R@1": (r == 1).double().mean().item(), "R@10": top10.mean().item()}


def reciprocal_ranks(ranks):
    """Each query's share of MRR@10: 1 / rank, 0 past rank 10."""
    r = torch.as_tensor(ranks).double()
    return torch.where(r <= 10, 1 / r, torch.zeros_like(r))


def paired_bootstrap(ranks_a, ranks_b, resamples=10_000, seed=0):
    """MRR@10 of a minus that of b on the same queries, and the 95% interval of the difference
    from resampling the queries with replacement (both systems keep each query's pair). Either
    side may be several seeds of a system, (seeds, n_queries): each query's reciprocal rank is
    then the seeds' mean, so the interval is over queries with the seeds averaged."""
    def per_query(ranks):
        rr = reciprocal_ranks(ranks)
        return rr.mean(0) if rr.dim() == 2 else rr
    diff = per_query(ranks_a) - per_query(ranks_b)                                   # (n_queries,)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diff), (resamples, len(diff)), generator=g)
    means = diff[picks].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": diff.mean().item(), "lo": lo, "hi": hi}


# ----------------------------------------------------------------------------- reranking

def pair_ids(query_ids, code_ids):
    """[CLS] query [SEP] function [SEP]: one sequence of both (code_ids' own [CLS] dropped)."""
    return query_ids + code_ids[1:]


@torch.inference_mode()
def pair_logits(model, seqs, bf16=False, batch_tokens=16384, desc=None):
    """(n_seqs,) float32 first logit of a cross-encoder, in packed runs of batch_tokens tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with tqdm(total=len(seqs), desc=desc, unit="pair", disable=desc is None, leave=False) as bar:
        for run in token_budget_runs([len(s) for s in seqs], batch_tokens):
            with autocast_for(device, bf16):
                out.append(model([seqs[i] for i in run]).float()[:, 0].cpu())
            bar.update(len(run))
    model.train(was_training)
    return torch.cat(out)


def reranked(first_stage, top, logits):
    """first_stage scores (n_queries, n_docs) with each query's candidates top (n_queries, k)
    moved above every other candidate and ordered by logits (n_queries, k)."""
    first_stage = torch.as_tensor(first_stage, dtype=torch.float64)
    lifted = logits.double() - logits.min() + first_stage.max() + 1   # above every first score
    return first_stage.scatter(1, top, lifted)


def load_reranker(directory, device=None):
    """(cross-encoder, tokenizer, settings) from finetune.py's DIRECTORY/ckpt.pt: this head with
    one logit, the score of a (query, function) pair."""
    path = os.path.join(directory, "ckpt.pt")
    ckpt = load_checkpoint(path)
    try:
        encoder = ModernBERT(Config(**ckpt["config"]))
        model = Classifier(quiet_encoder(encoder), 1, "cls")
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path} is not a finetune.py cross-encoder checkpoint: {e}") from None
    tokenizer, _ = model_tokenizer(os.path.join(directory, "tokenizer.json"),
                                   encoder.config.vocab_size)
    return model.to(pick_device(device or "auto")).eval(), tokenizer, ckpt["settings"]


# ----------------------------------------------------------------------------- hard negatives

def fingerprint(pair):
    """What near_duplicate compares: the name, the docstring's words, the code's words."""
    return pair["name"], set(code_words(pair["query"])), set(code_words(pair["code"]))


def jaccard(a, b):
    return len(a & b) / max(1, len(a | b))


def near_duplicate(a, b, query_overlap=0.6, code_overlap=0.8):
    """Whether the pair with fingerprint b may answer a's query as well as a's own function: the
    same name, or most of the docstring's words, or most of the code's words in common (the
    standard library is full of overrides that share a docstring). Such a candidate is no
    negative."""
    return (a[0] == b[0] or jaccard(a[1], b[1]) >= query_overlap
            or jaccard(a[2], b[2]) >= code_overlap)


def hard_negatives(scores, pairs, n, look=None):
    """For each query i, the indices of the n best-scoring candidates (scores: (n_pairs, n_pairs),
    BM25 of query i against function j) that are neither i's own function nor a near duplicate
    of it, best first; fewer when the top `look` (default 4n) holds fewer."""
    scores = torch.as_tensor(scores)
    look = min(len(pairs), look or 4 * n)
    prints = [fingerprint(p) for p in pairs]
    found = []
    for i, top in enumerate(scores.topk(look, dim=1).indices.tolist()):
        keep = [j for j in top if j != i and not near_duplicate(prints[i], prints[j])]
        found.append(keep[:n])
    return found


# ----------------------------------------------------------------------------- searching a folder

DEFAULT_SEARCH_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "modernbert_search.pt")


def python_files(directory):
    """The *.py files under directory (or directory itself, a file), hidden folders skipped."""
    if os.path.isfile(directory):
        return [directory]
    if not os.path.isdir(directory):
        raise ValueError(f"cannot read --in {directory!r}: no such file or directory")
    found = []
    for folder, subfolders, files in os.walk(directory):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # .git, .venv, ...
        found += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return found


def read_cache(cache_path, model_key):
    """The embedding cache of this model, or an empty one (a broken cache is rebuilt)."""
    if cache_path and os.path.exists(cache_path):
        try:
            cache = torch.load(cache_path, weights_only=True)
            if cache.get("model") == model_key:
                return cache
        except Exception:
            pass
    return {"model": model_key, "files": {}}


def function_embeddings(model, tokenizer, model_path, files, pool, cache_path, batch_tokens):
    """([(file, name, line)], (n_functions, d_model) embeddings) of every function in files, each
    embedded from its whole source, docstring included. cache_path keeps them per file, keyed by
    the model and the file's mtime and size, so a second search embeds only what changed."""
    model_key = f"{os.path.abspath(model_path)}:{os.stat(model_path).st_mtime_ns}:{pool}"
    cache = read_cache(cache_path, model_key)
    todo, fresh = [], {}
    for path in files:
        key, st = os.path.abspath(path), os.stat(path)
        if cache["files"].get(key, {}).get("stamp") == [st.st_mtime_ns, st.st_size]:
            fresh[key] = cache["files"][key]
            continue
        try:
            with open(path, encoding="utf-8") as f:
                functions = code_functions(f.read()) or []  # None: not Python that parses
        except (OSError, UnicodeDecodeError):  # not text we can read: no functions to find
            functions = []
        fresh[key] = {"stamp": [st.st_mtime_ns, st.st_size],
                      "functions": [[f["name"], f["line"]] for f in functions],
                      "embeddings": torch.zeros(0)}
        todo += [(key, f["code"]) for f in functions]
    if todo:
        embeddings = embed(model, tokenizer, [code for _, code in todo], MAX_DOC_TOKENS, pool,
                           batch_tokens=batch_tokens, desc="embedding functions")
        for key in {k for k, _ in todo}:
            fresh[key]["embeddings"] = embeddings[[i for i, (k, _) in enumerate(todo) if k == key]]
    found = [(key, name, line) for key in fresh for name, line in fresh[key]["functions"]]
    if not found:
        raise ValueError(f"no Python functions in the {len(files)} *.py files of --in")
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        save_atomic(cache_path, {"model": model_key, "files": fresh})
    return found, torch.cat([fresh[key]["embeddings"] for key in fresh
                             if fresh[key]["functions"]])


def functions_under(files):
    """[(file, name, line, code)] of every function in files, in function_embeddings' order."""
    found = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                functions = code_functions(f.read()) or []
        except (OSError, UnicodeDecodeError):
            functions = []
        found += [(os.path.abspath(path), f["name"], f["line"], f["code"]) for f in functions]
    if not found:
        raise ValueError(f"no Python functions in the {len(files)} *.py files of --in")
    return found


MODES = ("bm25", "dense", "hybrid", "rerank")


def search_code(directory, query, mode, model=None, tokenizer=None, model_path=None,
                reranker=None, top_k=5, pool="mean", cache_path=None, batch_tokens=8192,
                rerank_top_k=20, bm25_weight=0.3):
    """The top_k functions of the *.py files under directory (hidden folders skipped) for a
    query, best first: (score, file from directory's parent, line, name). mode: bm25 over the
    functions' words; dense, the cosine of the model's embeddings; hybrid, their weighted
    fusion (bm25_weight on BM25's standardized scores, the rest on the cosines'); rerank, BM25's
    top rerank_top_k reordered by the cross-encoder `reranker` (the score: its logit, shifted
    above every BM25 score)."""
    if not query.strip():
        raise ValueError("--search is empty")
    files = python_files(directory)
    listing = functions_under(files) if mode != "dense" else None
    scores = {}
    if mode in ("dense", "hybrid"):
        found, docs = function_embeddings(model, tokenizer, model_path, files, pool, cache_path,
                                          batch_tokens)              # docs: (n_functions, d_model)
        q = embed(model, tokenizer, [query], MAX_QUERY_TOKENS, pool, batch_tokens=batch_tokens)
        scores["dense"] = (F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).T)[0]
    else:
        found = [(path, name, line) for path, name, line, _ in listing]
    if listing is not None:
        assert [f[:3] for f in listing] == found  # one order for both
        scores["bm25"] = torch.as_tensor(bm25_scores([query], [f[3] for f in listing],
                                                     progress=False)[0])
    if mode == "hybrid":
        scores["hybrid"] = weighted_fusion(scores["bm25"][None], scores["dense"][None],
                                           bm25_weight)[0]
    if mode == "rerank":
        sep = tokenizer.token_to_id("[SEP]")
        top = scores["bm25"].topk(min(rerank_top_k, len(found))).indices
        q_ids = encode(tokenizer, [query])
        q_ids = truncated(q_ids, MAX_QUERY_TOKENS, sep)[0]
        codes = truncated(encode(tokenizer, [listing[i][3] for i in top.tolist()]),
                          MAX_DOC_TOKENS, sep)
        logits = pair_logits(reranker, [pair_ids(q_ids, c) for c in codes], False, batch_tokens)
        scores["rerank"] = reranked(standardized(scores["bm25"][None]), top[None],
                                    logits[None])[0]
    best = scores[mode].double().topk(min(top_k, len(found)))
    shown_from = os.path.dirname(os.path.abspath(directory).rstrip(os.sep))  # "importlib/abc.py"
    return [(score, os.path.relpath(found[i][0], shown_from), found[i][2], found[i][1])
            for score, i in zip(best.values.tolist(), best.indices.tolist())]
