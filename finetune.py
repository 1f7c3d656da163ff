"""
Fine-tune a pretrained ModernBERT for code search, and measure it on code pretraining never saw.

The default corpus already holds the task CodeSearchNet measures: find the function a docstring
describes. Every function with a docstring is a (query, document) pair: the query is the
docstring's first paragraph, the document is the function's code with its docstrings removed.
Training pairs come from prepare.py's train files, test pairs from its val files.

    python finetune.py                              # newest out/phase*/ckpt.pt -> out/finetune/
    python finetune.py --init_from path/to/run_or_hf_dir --out out/ft2
    python finetune.py --resume                     # continue an interrupted fine-tune exactly
    python finetune.py --compare out_other          # another model fine-tuned alike, same table
    python sample.py --init_from out/finetune --search "read the whole file" --in some/code/

Training is contrastive with in-batch negatives (InfoNCE; sentence-transformers calls it
MultipleNegativesRankingLoss): each query must pick its own function out of the batch. The table
ranks every test function for every test query: BM25, each model before fine-tuning
(zero-shot) and after. out/finetune/ holds ckpt.pt, tokenizer.json, hf/ and results.json.
"""
import argparse
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from codesearch import (MAX_DOC_TOKENS, MAX_QUERY_TOKENS, bm25_scores, code_functions,
                        gold_ranks, retrieval_metrics)
from prepare import load_meta, split_files
from runtime import (DEFAULT_RUN_DIR, autocast_for, device_flag, embed, encode, export_hf,
                     find_model, load_model, one_line_errors, pick_device, planned_run,
                     pooled, save_atomic, setting_flags, speed_setup, truncated)
from train import make_optimizer

DEFAULTS = dict(steps=400, batch_size=32, lr=2e-4, warmup=0.1, weight_decay=1e-5,
                temperature=0.05, pool="mean", max_query_tokens=MAX_QUERY_TOKENS,
                max_doc_tokens=MAX_DOC_TOKENS, min_query_words=3, seed=1337)


# ----------------------------------------------------------------------------- pairs

def first_paragraph(docstring):
    return " ".join(re.split(r"\n\s*\n", docstring.strip())[0].split())


def file_pairs(paths, root, min_words, desc):
    """(pairs, counts) of the functions in these files: each pair {"query", "code", "file",
    "line", "name"}. Dropped: docstrings under min_words words, functions that are only a
    docstring, and every copy of a query or of a code that occurs more than once (a duplicate
    has no single right answer)."""
    found = []
    counts = dict(files=len(paths), unparsable=0, with_docstring=0, short=0, only_docstring=0)
    for path in tqdm(paths, desc=desc, unit="file", leave=False):
        text = Path(path).read_text(encoding="utf-8")
        functions = code_functions(text, strip_docstrings=True)
        counts["unparsable"] += functions is None
        for f in functions or []:
            if f["docstring"] is None:
                continue
            counts["with_docstring"] += 1
            query = first_paragraph(f["docstring"])
            if len(query.split()) < min_words:
                counts["short"] += 1
            elif f["body"] == 0:
                counts["only_docstring"] += 1
            else:
                found.append({"query": query, "code": f["code"],
                              "file": os.path.relpath(path, root), "line": f["line"],
                              "name": f["name"]})
    query_n = Counter(p["query"].lower() for p in found)
    code_n = Counter(" ".join(p["code"].split()) for p in found)
    pairs = [p for p in found if query_n[p["query"].lower()] == 1
             and code_n[" ".join(p["code"].split())] == 1]
    counts["duplicate_query"] = sum(n for n in query_n.values() if n > 1)
    # the rest of the drops
    counts["duplicate_code"] = len(found) - len(pairs) - counts["duplicate_query"]
    counts["pairs"] = len(pairs)
    return pairs, counts


def load_pairs(data_dir, min_words):
    """Train pairs from prepare.py's train files, test pairs from its val files."""
    train_files, val_files = split_files(data_dir)
    root = os.path.commonpath([os.path.abspath(p.parent) for p in train_files + val_files])
    train, test = [], []
    for name, paths, pairs in (("train", train_files, train), ("test", val_files, test)):
        found, c = file_pairs(paths, root, min_words, desc=f"{name} pairs")
        pairs += found
        print(f"{name}: {c['files']} files ({c['unparsable']} unparsable), "
              f"{c['with_docstring']} functions with a docstring; dropped {c['short']} under "
              f"{min_words} words, {c['only_docstring']} docstring-only, "
              f"{c['duplicate_query']} duplicate docstrings, {c['duplicate_code']} duplicate "
              f"code: {len(found)} pairs")
        if not found:
            raise ValueError(f"no docstring pairs in the {name} split's {len(paths)} files of "
                             f"{data_dir} (functions with a docstring of at least {min_words} "
                             "words)")
    return train, test


# ----------------------------------------------------------------------------- loss

def info_nce(queries, docs, temperature):
    """InfoNCE with in-batch negatives: query i's positive is document i, the batch's other
    documents are its negatives; cosine similarities divided by the temperature."""
    scores = F.normalize(queries, dim=-1) @ F.normalize(docs, dim=-1).T / temperature  # (n, n)
    return F.cross_entropy(scores, torch.arange(len(scores), device=scores.device))


def evaluate(model, tokenizer, test, settings, bf16, desc):
    """Metrics of a model on the test pairs: every test function is a candidate for every query."""
    model.eval()
    q = embed(model, tokenizer, [p["query"] for p in test], settings["max_query_tokens"],
              settings["pool"], bf16, desc=f"{desc}: queries")
    d = embed(model, tokenizer, [p["code"] for p in test], settings["max_doc_tokens"],
              settings["pool"], bf16, desc=f"{desc}: functions")
    return retrieval_metrics(gold_ranks(F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T))


# ----------------------------------------------------------------------------- fine-tuning

def finetune_lr(step, settings):
    """Linear warmup over the first `warmup` share of the steps, then linear decay to 0."""
    steps = settings["steps"]
    warmup = max(1, round(settings["warmup"] * steps))
    return settings["lr"] * min((step + 1) / warmup, (steps - step) / max(1, steps - warmup))


def next_pairs(position, n, n_pairs, seed):
    """The next n pair indices of a seeded shuffle per epoch, and the position after them. An
    epoch's last pairs that do not fill a batch are skipped, so no pair meets itself as a
    negative."""
    epoch, used = position
    if used + n > n_pairs:
        epoch, used = epoch + 1, 0
    order = np.random.default_rng([seed, epoch]).permutation(n_pairs)
    return order[used:used + n].tolist(), [epoch, used + n]


def finetune(model, tokenizer, pairs, settings, out_dir, resumed, bf16, source, tokenizer_file,
             ckpt_every):
    """Trains model in place for settings["steps"] steps of settings["batch_size"] pairs; writes
    out_dir/ckpt.pt (atomically, every ckpt_every steps and at the end), and at the end
    tokenizer.json and hf/."""
    sep = tokenizer.token_to_id("[SEP]")
    queries = truncated(encode(tokenizer, [p["query"] for p in pairs]),
                        settings["max_query_tokens"], sep)
    docs = truncated(encode(tokenizer, [p["code"] for p in pairs]), settings["max_doc_tokens"], sep)
    optimizer = make_optimizer(model, settings["lr"], settings["weight_decay"])
    step, position = 0, [0, 0]
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, position = resumed["step"], resumed["position"]
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    os.makedirs(out_dir, exist_ok=True)
    # sample.py loads ckpt.pt with the tokenizer beside it
    shutil.copy(tokenizer_file, os.path.join(out_dir, "tokenizer.json"))

    def checkpoint(finished):
        save_atomic(ckpt_path, {"config": asdict(model.config), "model": model.state_dict(),
                                "optimizer": optimizer.state_dict(), "settings": settings,
                                "step": step, "position": position, "finished": finished,
                                "init_from": source})

    model.train()
    device = model.tok_embeddings.weight.device
    bar = tqdm(total=settings["steps"], initial=step, unit="step", desc=f"fine-tuning {source}",
               dynamic_ncols=True)
    while step < settings["steps"]:
        start = time.perf_counter()
        batch, position = next_pairs(position, settings["batch_size"], len(pairs), settings["seed"])
        with autocast_for(device, bf16):
            # Queries and documents in one packed forward: (2 * batch, d_model), queries first.
            embeddings = pooled(model, [queries[i] for i in batch] + [docs[i] for i in batch],
                                settings["pool"])
        loss = info_nce(*embeddings.chunk(2), settings["temperature"])
        if not math.isfinite(loss.item()):
            raise ValueError(f"loss is {loss.item()} at step {step + 1}; nothing saved for it. "
                             "Try a lower --lr")
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = finetune_lr(step, settings)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{finetune_lr(step - 1, settings):.2e}",
                        pairs_s=f"{len(batch) / (time.perf_counter() - start):.1f}")
        if step % ckpt_every == 0 and step < settings["steps"]:
            checkpoint(finished=False)
    bar.close()
    # a transformers and a sentence-transformers directory, pooling as trained
    export_hf(model, out_dir, tokenizer_file, pooling=settings["pool"])
    checkpoint(finished=True)  # last, so a finished checkpoint implies the export is there


# ----------------------------------------------------------------------------- main

SETTING_HELP = {
    "steps": "optimizer steps",
    "batch_size": "pairs per step; the other pairs' functions are the negatives",
    "lr": "peak learning rate (StableAdamW)",
    "warmup": "share of the steps with a rising LR, then linear decay to 0",
    "weight_decay": "decoupled weight decay",
    "temperature": "of the cosine similarities (sentence-transformers' scale = 1 / temperature)",
    "pool": "embedding: the mean of the final states, or the [CLS] state",
    "max_query_tokens": "queries are cut to this", "max_doc_tokens": "functions are cut to this",
    "min_query_words": "shorter docstrings are dropped", "seed": "seed of the data order"}
CHECKS = {  # flag: (test, what it must be)
    "steps": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 2, "at least 2 (the negatives)"),
    "lr": (lambda v: v > 0, "positive"), "temperature": (lambda v: v > 0, "positive"),
    "warmup": (lambda v: 0 <= v < 1, "in [0, 1)"), "weight_decay": (lambda v: v >= 0, "0 or more"),
    "max_query_tokens": (lambda v: v >= 3, "at least 3 ([CLS], a token, [SEP])"),
    "max_doc_tokens": (lambda v: v >= 3, "at least 3 ([CLS], a token, [SEP])"),
    "min_query_words": (lambda v: v >= 1, "at least 1"),
    "ckpt_every": (lambda v: v >= 1, "at least 1")}


def get_args(argv):
    p = argparse.ArgumentParser(prog="finetune.py", description="Fine-tune ModernBERT for code "
                                "search (docstring -> function); compare with BM25 and zero-shot "
                                "on held-out files.")
    p.add_argument("--init_from", metavar="PATH", help="our ckpt.pt, its directory, a run "
                   "directory (newest phase), or a Hugging Face ModernBERT directory (default: "
                   f"newest {DEFAULT_RUN_DIR}/phase*/ckpt.pt)")
    p.add_argument("--compare", metavar="PATH", action="append", default=[],
                   help="another model, fine-tuned the same way into OUT/compareN and added to "
                        "the table; repeatable")
    p.add_argument("--data", default="data/stdlib", help="prepare.py's output, whose split picks "
                   "the files (default: %(default)s)")
    p.add_argument("--out", default="out/finetune", help="ckpt.pt, tokenizer.json, hf/, "
                   "results.json (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue OUT/ckpt.pt (a finished one is only evaluated)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if OUT/ckpt.pt exists")
    setting_flags(p, DEFAULTS, SETTING_HELP, {"pool": ["mean", "cls"]})
    g = p.add_argument_group("running")
    g.add_argument("--ckpt_every", type=int, default=100,
                   help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast; auto: where a bf16 matmul measures faster "
                        "(default: %(default)s)")
    g.add_argument("--device", type=device_flag, help="default: cuda, else mps, else cpu")
    args = p.parse_args(argv)
    for key, (ok, want) in CHECKS.items():
        value = getattr(args, key)
        if value is not None and not (math.isfinite(value) and ok(value)):
            p.error(f"--{key} must be {want}, got {value}")
    if args.resume and args.overwrite:
        p.error("--resume continues a run, --overwrite starts it over: pick one")
    return args


def markdown_table(rows):
    lines = ["| model | MRR@10 | NDCG@10 | Recall@1 | Recall@10 | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['name']} | {m['MRR@10']:.3f} | {m['NDCG@10']:.3f} | {m['R@1']:.3f} "
                     f"| {m['R@10']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def before_and_after(model, tokenizer, source, settings, resumed, out_dir, train, test, bf16,
                     ckpt_every):
    """The table's two rows for one model: as pretrained (zero-shot), then fine-tuned (now, or
    from a finished checkpoint in out_dir)."""
    # no dropout: Hugging Face's default for fine-tuning, and --resume stays exact
    for block in model.layers:
        block.attn.out_drop.p = 0.0
    model.config.attn_out_dropout = 0.0
    rows = []
    for name in ("zero-shot", "fine-tuned"):
        start = time.perf_counter()
        if name == "fine-tuned" and resumed and resumed["finished"]:
            model.load_state_dict(resumed["model"])
        elif name == "fine-tuned":
            folder = source if os.path.isdir(source) else os.path.dirname(source)
            finetune(model, tokenizer, train, settings, out_dir, resumed, bf16, source,
                     os.path.join(folder, "tokenizer.json"), ckpt_every)
        metrics = evaluate(model, tokenizer, test, settings, bf16, name)
        rows.append({"name": f"{source} {name}", "metrics": metrics,
                     "seconds": time.perf_counter() - start})
        tqdm.write(f"{rows[-1]['name']}: MRR@10 {metrics['MRR@10']:.3f}, "
                   f"{rows[-1]['seconds']:.0f} s")
    rows[-1].update(out=out_dir, settings=settings)
    return rows


def main(argv=None):
    began = time.perf_counter()
    args = get_args(argv)
    with one_line_errors("finetune.py"):
        return run_all(args, began)


def run_all(args, began):
    """Every check first (paths, data, models, checkpoints), so bad input writes nothing; then
    BM25 and each model before and after fine-tuning, in one table."""
    device = pick_device(args.device or "auto")
    sources = [find_model(path) for path in [args.init_from, *args.compare]]
    load_meta(args.data)  # "run prepare.py first"
    out_dirs = [args.out] + [os.path.join(args.out, f"compare{k}") for k in range(1, len(sources))]
    runs = [planned_run(args, DEFAULTS, source, out_dir, "finetune.py")
            for source, out_dir in zip(sources, out_dirs)]
    train, test = load_pairs(args.data, runs[0][0]["min_query_words"])
    models = []
    for source, (settings, _) in zip(sources, runs):
        models.append(load_model(source, device))
        context = models[-1][0].config.max_seq_len
        if max(settings["max_query_tokens"], settings["max_doc_tokens"]) > context:
            raise ValueError(f"--max_doc_tokens/--max_query_tokens exceed {source}'s context of "
                             f"{context}")
        if settings["batch_size"] > len(train):
            raise ValueError(f"--batch_size {settings['batch_size']} is more than the {len(train)} "
                             "training pairs")
    bf16 = speed_setup(device, args.dtype, "off")[0]
    print(f"{len(train)} training pairs, {len(test)} test pairs (each test query ranks all "
          f"{len(test)} test functions); {device}, {'bf16 autocast' if bf16 else 'fp32'}")

    start = time.perf_counter()
    bm25 = bm25_scores([p["query"] for p in test], [p["code"] for p in test])
    rows = [{"name": "BM25", "metrics": retrieval_metrics(gold_ranks(bm25)),
             "seconds": time.perf_counter() - start}]
    for source, (settings, resumed), out_dir, (model, tokenizer, _) in zip(sources, runs, out_dirs,
                                                                     models):
        rows += before_and_after(model, tokenizer, source, settings, resumed, out_dir, train, test,
                                 bf16, args.ckpt_every)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"train_pairs": len(train), "test_pairs": len(test), "bf16": bf16,
                   "rows": rows, "wall_seconds": time.perf_counter() - began}, f, indent=2)
    print("\n" + markdown_table(rows))
    print(f"\nseconds: BM25 indexing and scoring; zero-shot: embedding the test set; fine-tuned: "
          f"training and embedding. Wall time {time.perf_counter() - began:.0f} s in all -> "
          f"{args.out}/")
    return rows


if __name__ == "__main__":
    main()
