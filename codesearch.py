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

from runtime import embed, save_atomic

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


def bm25_scores(queries, docs):
    """(n_queries, n_docs) BM25 scores (bm25s, its default Lucene variant, k1 1.5, b 0.75)."""
    import bm25s  # only here: loading it takes a moment that a dense search does not need
    index = bm25s.BM25()
    index.index([code_words(d) or ["<empty>"] for d in docs], show_progress=False)
    return np.stack([index.get_scores(code_words(q)) for q in tqdm(queries, desc="BM25",
                                                                   leave=False)])


# ----------------------------------------------------------------------------- ranks and metrics

def gold_ranks(scores):
    """1-based rank of each query's own document (the diagonal) among all candidates. A tie
    counts against it: BM25 scores a query sharing no word with anything 0 everywhere, which is
    a miss, not rank 1."""
    scores = torch.as_tensor(scores)                                       # (n_queries, n_docs)
    return (scores >= scores.diagonal()[:, None]).sum(1)


def retrieval_metrics(ranks):
    """With one relevant document per query: MRR@10 = mean 1/rank (0 past 10), NDCG@10 = mean
    1/log2(rank + 1) (ideal DCG is 1), Recall@k = share found in the top k."""
    r = torch.as_tensor(ranks).double()
    top10 = (r <= 10).double()
    return {"MRR@10": (top10 / r).mean().item(),
            "NDCG@10": (top10 / torch.log2(r + 1)).mean().item(),
            "R@1": (r == 1).double().mean().item(), "R@10": top10.mean().item()}


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


def search_code(model, tokenizer, model_path, directory, query, top_k=5, pool="mean",
                cache_path=None, batch_tokens=8192):
    """The top_k functions of the *.py files under directory (hidden folders skipped) for a
    query, best first: (cosine, file, line, name)."""
    if not query.strip():
        raise ValueError("--search is empty")
    found, docs = function_embeddings(model, tokenizer, model_path, python_files(directory), pool,
                                      cache_path, batch_tokens)      # docs: (n_functions, d_model)
    q = embed(model, tokenizer, [query], MAX_QUERY_TOKENS, pool, batch_tokens=batch_tokens)
    scores = (F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).T)[0]        # (n_functions,)
    top = scores.topk(min(top_k, len(found)))
    return [(score, os.path.relpath(found[i][0]), found[i][2], found[i][1])
            for score, i in zip(top.values.tolist(), top.indices.tolist())]
