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
    python finetune.py --seeds_of ft1 ft2 ft3 --against other1 other2 other3   # seeds, read only
    python sample.py --init_from out/finetune --search "read the whole file" --in some/code/

Training is contrastive with in-batch negatives (InfoNCE; sentence-transformers calls it
MultipleNegativesRankingLoss): each query must pick its own function out of the batch, and with
--hard_negatives also out of functions BM25 ranks high for it. A share of the train files is
held out as dev, which picks the fusion weight (never the test queries).

Two test sets: the stdlib val files' pairs (every test function a candidate for every query), and
code pretraining never saw, the pinned packages in PACKAGES, in pools of 1,000 as CodeSearchNet
ranks them, one more pool of theirs picking their own fusion weight. On both: BM25, each model
before fine-tuning (zero-shot) and after, the hybrids of BM25 and the model (reciprocal rank
fusion; a weighted sum of standardized scores), and with --rerank_steps a cross-encoder
(classify.py's head, one logit) that reorders BM25's top-k. Every system's per-query ranks go to
results.json, with the paired bootstrap interval of its MRR@10 against BM25. out/finetune/
holds ckpt.pt, tokenizer.json, hf/, rerank/ and results.json.
"""
import argparse
import importlib.metadata
import importlib.util
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

import codesearch as cs
from codesearch import MAX_DOC_TOKENS, MAX_QUERY_TOKENS, code_functions
from prepare import load_meta, split_files
from runtime import (DEFAULT_RUN_DIR, Classifier, autocast_for, device_flag, embed, encode,
                     export_classifier, export_hf, find_model, load_model, mean_interval,
                     one_line_errors, pick_device, planned_run, pooled, quiet_encoder,
                     save_atomic, setting_flags, speed_setup, truncated, write_json)
from train import make_optimizer

DEFAULTS = dict(steps=800, batch_size=32, lr=5e-4, warmup=0.1, weight_decay=1e-5,
                temperature=0.05, pool="mean", max_query_tokens=MAX_QUERY_TOKENS,
                max_doc_tokens=MAX_DOC_TOKENS, min_query_words=3, hard_negatives=0,
                loss="one-way", seed=1337)
# The cross-encoder: off unless --rerank_steps; it shares warmup, decay, lengths and seed above.
RERANK_DEFAULTS = dict(rerank_steps=0, rerank_queries=8, rerank_negatives=7, rerank_lr=1e-4,
                       rerank_top_k=20)
# The second test set: code that pretraining never saw, pinned in requirements.txt so that the
# pairs reproduce (distribution name: import name).
PACKAGES = {"scikit-learn": "sklearn", "matplotlib": "matplotlib"}
POOL = 1000  # candidates per query in the second test set, as CodeSearchNet
DEV_SHARE = 0.1  # of the train files, held out to choose the fusion weight
# Where each test set's fusion weight is chosen: the stdlib set's on that dev split; the packages'
# on a pool of their own pairs that is never scored as a test (the pool after the scored ones).
# Code unlike the training code wants more of BM25 (measured: README).
DEV_OF = {"stdlib": "dev", "packages": "packages-dev"}
DEV_SEED = 1337  # which files: fixed, so that every --seed trains and is chosen on the same pairs


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


def report(name, c, min_words):
    print(f"{name}: {c['files']} files ({c['unparsable']} unparsable), {c['with_docstring']} "
          f"functions with a docstring; dropped {c['short']} under {min_words} words, "
          f"{c['only_docstring']} docstring-only, {c['duplicate_query']} duplicate docstrings, "
          f"{c['duplicate_code']} duplicate code: {c['pairs']} pairs")


def load_pairs(data_dir, min_words):
    """{"train", "dev", "test"} pairs: train and dev from prepare.py's train files (dev: the
    DEV_SHARE of those files that DEV_SEED draws, whole files, so no file is in both), test from
    its val files."""
    train_files, val_files = split_files(data_dir)
    root = os.path.commonpath([os.path.abspath(p.parent) for p in train_files + val_files])
    splits = {}
    for name, paths in (("train", train_files), ("test", val_files)):
        found, c = file_pairs(paths, root, min_words, desc=f"{name} pairs")
        report(name, c, min_words)
        if not found:
            raise ValueError(f"no docstring pairs in the {name} split's {len(paths)} files of "
                             f"{data_dir} (functions with a docstring of at least {min_words} "
                             "words)")
        splits[name] = found
    files = sorted({p["file"] for p in splits["train"]})
    shuffled = np.random.default_rng(DEV_SEED).permutation(len(files))
    dev_files = {files[i] for i in shuffled[:max(1, round(DEV_SHARE * len(files)))]}
    if len(files) < 2:
        raise ValueError(f"the train split's pairs come from {len(files)} file: a dev split "
                         "needs at least 2")
    splits["dev"] = [p for p in splits["train"] if p["file"] in dev_files]
    splits["train"] = [p for p in splits["train"] if p["file"] not in dev_files]
    print(f"dev: {len(splits['dev'])} of those pairs, from {len(dev_files)} of the train files; "
          f"{len(splits['train'])} left to train on")
    return splits


def package_pairs(packages, min_words, pool=POOL, n_pools=None, seed=0):
    """(pools, versions): the pairs of the installed packages' sources (their tests/ folders left
    out) shuffled with a seed and cut into pools of `pool` pairs, the last partial pool dropped;
    each query ranks the functions of its own pool. versions names what was read."""
    files, versions = [], {}
    for dist, module in packages.items():
        try:
            versions[dist] = importlib.metadata.version(dist)
            where = importlib.util.find_spec(module).submodule_search_locations[0]
        except (importlib.metadata.PackageNotFoundError, AttributeError, TypeError):
            raise ValueError(f"package {dist} ({module}) is not installed: pip install -r "
                             "requirements.txt, or --packages none") from None
        files += sorted(p for p in Path(where).rglob("*.py")
                        if "tests" not in p.relative_to(where).parts)
    root = os.path.commonpath([os.path.abspath(p.parent) for p in files])
    pairs, c = file_pairs(files, root, min_words, desc="package pairs")
    report("packages " + ", ".join(f"{d}=={v}" for d, v in versions.items()), c, min_words)
    order = np.random.default_rng(seed).permutation(len(pairs))
    pools = [[pairs[i] for i in order[k:k + pool]] for k in range(0, len(pairs) - pool + 1, pool)]
    pools = pools[:n_pools]
    if not pools:
        raise ValueError(f"the packages give {len(pairs)} pairs, fewer than one pool of {pool}")
    print(f"packages: {len(pools)} pools of {pool} pairs ({len(pairs) - pool * len(pools)} "
          "left out)")
    return pools, versions


# ----------------------------------------------------------------------------- the bi-encoder

def info_nce(queries, docs, temperature, symmetric=False):
    """InfoNCE with in-batch negatives: query i's positive is document i, every other document is
    its negative (docs may hold more rows than queries: hard negatives, after the positives);
    cosine similarities divided by the temperature. symmetric adds the other direction, each
    positive document picking its query out of the batch's queries (as CLIP does)."""
    scores = F.normalize(queries, dim=-1) @ F.normalize(docs, dim=-1).T / temperature
    target = torch.arange(len(queries), device=scores.device)           # scores: (n, n_docs)
    loss = F.cross_entropy(scores, target)
    if symmetric:
        loss = (loss + F.cross_entropy(scores[:, :len(queries)].T, target)) / 2
    return loss


def dense_scores(model, tokenizer, pairs, settings, bf16, desc):
    """(n_queries, n_functions) cosines of a pool's queries and functions."""
    model.eval()
    q = embed(model, tokenizer, [p["query"] for p in pairs], settings["max_query_tokens"],
              settings["pool"], bf16, desc=f"{desc}: queries")
    d = embed(model, tokenizer, [p["code"] for p in pairs], settings["max_doc_tokens"],
              settings["pool"], bf16, desc=f"{desc}: functions")
    return F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T


def encoded_pairs(tokenizer, pairs, settings):
    """(queries, functions) of the pairs as token ids, each cut to its maximum length."""
    sep = tokenizer.token_to_id("[SEP]")
    queries = truncated(encode(tokenizer, [p["query"] for p in pairs]),
                        settings["max_query_tokens"], sep)
    docs = truncated(encode(tokenizer, [p["code"] for p in pairs]), settings["max_doc_tokens"], sep)
    return queries, docs


def bi_encoder_loss(model, tokenizer, pairs, settings, negatives):
    """batch -> loss of the bi-encoder: queries, their functions and (with hard_negatives) that
    many BM25-mined functions per query, in one packed forward."""
    queries, docs = encoded_pairs(tokenizer, pairs, settings)
    n_hard = settings["hard_negatives"]

    def loss(batch, step):
        rng = np.random.default_rng([settings["seed"], step])
        taken = set(batch)
        hard = []
        for i in batch:  # the miner's top candidates, none of them another query's positive
            options = [j for j in negatives[i] if j not in taken] if n_hard else []
            hard += [int(j) for j in rng.permutation(options)[:n_hard]] if options else []
            taken |= set(hard)
        seqs = ([queries[i] for i in batch] + [docs[i] for i in batch] + [docs[j] for j in hard])
        embeddings = pooled(model, seqs, settings["pool"])     # (2 * batch + hard, d_model)
        return info_nce(embeddings[:len(batch)], embeddings[len(batch):],
                        settings["temperature"], settings["loss"] == "symmetric")
    return loss


# ----------------------------------------------------------------------------- the cross-encoder

def rerank_loss(model, tokenizer, pairs, settings, negatives):
    """batch -> loss of the cross-encoder: each query with its function and rerank_negatives
    functions drawn from its BM25-mined negatives, `[CLS] query [SEP] function [SEP]` each, one
    logit per pair; cross-entropy over each query's group (the function's logit must win)."""
    queries, docs = encoded_pairs(tokenizer, pairs, settings)
    n_neg = settings["rerank_negatives"]

    def loss(batch, step):
        rng = np.random.default_rng([settings["seed"], step])
        groups = [[i] + [int(j) for j in rng.permutation(negatives[i])[:n_neg]] for i in batch]
        seqs = [cs.pair_ids(queries[i], docs[j]) for i, group in zip(batch, groups)
                for j in group]
        logits = model(seqs).float()[:, 0]                                       # (n_seqs,)
        width = max(len(g) for g in groups)  # a query with fewer negatives: -inf fills its row
        table = logits.new_full((len(batch), width), float("-inf"))
        at = 0
        for row, group in enumerate(groups):
            table[row, :len(group)] = logits[at:at + len(group)]
            at += len(group)
        return F.cross_entropy(table, torch.zeros(len(batch), dtype=torch.long,
                                                  device=table.device))
    return loss


def rerank_scores(model, tokenizer, pairs, bm25, settings, bf16, desc):
    """(n_queries, n_functions): BM25's top_k functions of each query reordered by the cross-
    encoder's logits, all above the rest, which keep BM25's order."""
    queries, docs = encoded_pairs(tokenizer, pairs, settings)
    bm25 = torch.as_tensor(bm25, dtype=torch.float64)
    top = bm25.topk(min(settings["rerank_top_k"], bm25.shape[1]), dim=1).indices  # (n, k)
    seqs = [cs.pair_ids(queries[i], docs[j]) for i, row in enumerate(top.tolist()) for j in row]
    logits = cs.pair_logits(model, seqs, bf16, desc=f"{desc}: reranking").double()
    return cs.reranked(cs.standardized(bm25), top, logits.view(top.shape))


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


def finetune(model, batch_loss, n_pairs, settings, out_dir, resumed, bf16, source, config,
             ckpt_every, export, desc="fine-tuning"):
    """Trains model in place for settings["steps"] steps of settings["batch_size"] pair indices,
    batch_loss(batch, step) giving each step's loss; writes out_dir/ckpt.pt (atomically, every
    ckpt_every steps and at the end), export() just before the last one. The bi-encoder and the
    cross-encoder both train here."""
    optimizer = make_optimizer(model, settings["lr"], settings["weight_decay"])
    step, position = 0, [0, 0]
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, position = resumed["step"], resumed["position"]
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    os.makedirs(out_dir, exist_ok=True)

    def checkpoint(finished):
        save_atomic(ckpt_path, {"config": config, "model": model.state_dict(),
                                "optimizer": optimizer.state_dict(), "settings": settings,
                                "step": step, "position": position, "finished": finished,
                                "init_from": source})

    model.train()
    device = next(model.parameters()).device
    bar = tqdm(total=settings["steps"], initial=step, unit="step", desc=f"{desc} {source}",
               dynamic_ncols=True)
    while step < settings["steps"]:
        start = time.perf_counter()
        batch, position = next_pairs(position, settings["batch_size"], n_pairs, settings["seed"])
        with autocast_for(device, bf16):
            loss = batch_loss(batch, step)
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
    export()
    checkpoint(finished=True)  # last, so a finished checkpoint implies the export is there


# ----------------------------------------------------------------------------- the systems

def set_ranks(score_pools):
    """Gold ranks of every query of a test set, pool after pool (ties broken at random)."""
    return torch.cat([cs.gold_ranks(s, seed=k) for k, s in enumerate(score_pools)])


def system_row(name, scores, seconds, **extra):
    """One system's table row: per test set, its metrics and every query's rank."""
    sets = {}
    for set_name, pools in scores.items():
        ranks = set_ranks(pools)
        sets[set_name] = {"metrics": cs.retrieval_metrics(ranks), "ranks": ranks.tolist()}
    return {"name": name, "sets": sets, "seconds": seconds, **extra}


def best_weight(bm25_dev, dense_dev):
    """The weighted fusion's BM25 weight with the best dev MRR@10, on a grid of tenths."""
    mrr = {w / 10: cs.retrieval_metrics(set_ranks([cs.weighted_fusion(b, d, w / 10) for b, d in
                                                   zip(bm25_dev, dense_dev)]))["MRR@10"]
           for w in range(11)}
    return max(mrr, key=mrr.get), mrr


def reported_sets(sets):
    """The test sets' names: every set but the dev sets, which only choose settings."""
    return [n for n in sets if n not in DEV_OF.values()]


def dense_rows(model, tokenizer, label, settings, sets, bm25, bf16, began):
    """The model's rows: dense alone, and its two hybrids with BM25 (each test set's weight
    chosen on its dev set, DEV_OF)."""
    dense = {name: [dense_scores(model, tokenizer, pool, settings, bf16, f"{label} {name}")
                    for pool in pools] for name, pools in sets.items()}
    tests = reported_sets(sets)
    rows = [system_row(f"{label}", {n: dense[n] for n in tests}, time.perf_counter() - began)]
    if "dev" not in sets:
        return rows, dense
    rows[0]["dev"] = cs.retrieval_metrics(set_ranks(dense["dev"]))  # what settings are chosen on
    rows.append(system_row(f"{label} + BM25, reciprocal rank fusion (k = 60)",
                           {n: [cs.reciprocal_rank_fusion([b, d]) for b, d in
                                zip(bm25[n], dense[n])] for n in tests}, 0.0))
    choices = {n: best_weight(bm25[DEV_OF[n]], dense[DEV_OF[n]]) for n in tests}
    weights = {n: weight for n, (weight, _) in choices.items()}
    chosen = ", ".join(f"{weights[n]:.1f} for {n}" for n in tests)
    rows.append(system_row(f"{label} + BM25, weighted (BM25 weight {chosen}, chosen on dev)",
                           {n: [cs.weighted_fusion(b, d, weights[n]) for b, d in
                                zip(bm25[n], dense[n])] for n in tests}, 0.0,
                           weight=weights["stdlib"], weights=weights,
                           dev_grid={n: grid for n, (_, grid) in choices.items()}))
    return rows, dense


def mined_negatives(pairs, n=20):
    """BM25-mined negatives of the training pairs: each query's top functions among all training
    functions, its own and near duplicates left out."""
    scores = cs.bm25_scores([p["query"] for p in pairs], [p["code"] for p in pairs])
    return cs.hard_negatives(scores, pairs, n)


def model_rows(source, settings, resumed, out_dir, rerank_plan, splits, sets, bm25, device, bf16,
               ckpt_every):
    """One model's rows: as pretrained (zero-shot), fine-tuned (now, or from a finished checkpoint
    in out_dir) with its hybrids, and with a rerank plan the cross-encoder over BM25's top-k."""
    model, tokenizer, _ = load_model(source, device)
    # no dropout: Hugging Face's default for fine-tuning, and --resume stays exact
    quiet_encoder(model)
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    tokenizer_file = os.path.join(folder, "tokenizer.json")
    tests = {n: sets[n] for n in reported_sets(sets)}
    began = time.perf_counter()
    rows = dense_rows(model, tokenizer, f"{source} zero-shot", settings, tests, bm25, bf16,
                      began)[0]
    train = splits["train"]
    needs_mining = (settings["hard_negatives"] and not (resumed and resumed["finished"])) or (
        rerank_plan and not (rerank_plan[1] and rerank_plan[1]["finished"]))
    negatives = mined_negatives(train) if needs_mining else None
    began = time.perf_counter()
    if resumed and resumed["finished"]:
        model.load_state_dict(resumed["model"])
    else:
        os.makedirs(out_dir, exist_ok=True)
        shutil.copy(tokenizer_file, os.path.join(out_dir, "tokenizer.json"))  # sample.py's
        finetune(model, bi_encoder_loss(model, tokenizer, train, settings, negatives), len(train),
                 settings, out_dir, resumed, bf16, source, asdict(model.config), ckpt_every,
                 # a transformers and a sentence-transformers directory, pooling as trained
                 lambda: export_hf(model, out_dir, tokenizer_file, pooling=settings["pool"]))
    found, _ = dense_rows(model, tokenizer, f"{source} fine-tuned", settings, sets, bm25, bf16,
                          began)
    found[0].update(out=out_dir, settings=settings)
    rows += found
    if rerank_plan:
        rows.append(rerank_row(source, settings, rerank_plan, out_dir, train, sets, bm25,
                               negatives, device, bf16, ckpt_every, tokenizer_file))
    return rows


def rerank_row(source, settings, rerank_plan, out_dir, train, sets, bm25, negatives, device,
               bf16, ckpt_every, tokenizer_file):
    """The cross-encoder, fine-tuned from the pretrained model (not the bi-encoder) into
    out_dir/rerank, reordering BM25's top_k on dev and on every test set."""
    rerank_settings, resumed = rerank_plan
    s = {**settings, **rerank_settings, "steps": rerank_settings["rerank_steps"],
         "batch_size": rerank_settings["rerank_queries"], "lr": rerank_settings["rerank_lr"]}
    encoder, tokenizer, _ = load_model(source, device)
    torch.manual_seed(s["seed"])
    model = Classifier(quiet_encoder(encoder), 1, "cls").to(device)
    rerank_dir = os.path.join(out_dir, "rerank")
    began = time.perf_counter()
    if resumed and resumed["finished"]:
        model.load_state_dict(resumed["model"])
    else:
        os.makedirs(rerank_dir, exist_ok=True)
        shutil.copy(tokenizer_file, os.path.join(rerank_dir, "tokenizer.json"))
        finetune(model, rerank_loss(model, tokenizer, train, s, negatives), len(train), s,
                 rerank_dir, resumed, bf16, source, asdict(encoder.config), ckpt_every,
                 lambda: export_classifier(model, rerank_dir, tokenizer_file, ["relevant"]),
                 desc="cross-encoder")
    scored = reported_sets(sets) + ["dev"]  # (nothing to choose on packages-dev)
    scores = {n: [rerank_scores(model, tokenizer, pool, b, s, bf16, f"rerank {n}")
                  for pool, b in zip(sets[n], bm25[n])] for n in scored}
    row = system_row(f"{source} cross-encoder over BM25's top {s['rerank_top_k']}",
                     {n: scores[n] for n in reported_sets(sets)}, time.perf_counter() - began,
                     out=rerank_dir, settings=rerank_settings)
    row["dev"] = cs.retrieval_metrics(set_ranks(scores["dev"]))  # what its settings are chosen on
    return row


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
    "min_query_words": "shorter docstrings are dropped",
    "hard_negatives": "BM25-mined functions per query added to each batch's negatives",
    "loss": "one-way: each query picks its function; symmetric: and each function its query",
    "seed": "seed of the data order and of the hard negatives drawn"}
RERANK_HELP = {
    "rerank_steps": "steps of the cross-encoder over BM25's top-k (0: none)",
    "rerank_queries": "queries per cross-encoder step, each with its function and negatives",
    "rerank_negatives": "BM25-mined negatives per query and step",
    "rerank_lr": "the cross-encoder's peak learning rate",
    "rerank_top_k": "BM25 candidates the cross-encoder reorders"}
CHECKS = {  # flag: (test, what it must be)
    "steps": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 2, "at least 2 (the negatives)"),
    "lr": (lambda v: v > 0, "positive"), "temperature": (lambda v: v > 0, "positive"),
    "warmup": (lambda v: 0 <= v < 1, "in [0, 1)"), "weight_decay": (lambda v: v >= 0, "0 or more"),
    "max_query_tokens": (lambda v: v >= 3, "at least 3 ([CLS], a token, [SEP])"),
    "max_doc_tokens": (lambda v: v >= 3, "at least 3 ([CLS], a token, [SEP])"),
    "min_query_words": (lambda v: v >= 1, "at least 1"),
    "hard_negatives": (lambda v: v >= 0, "0 or more"),
    "rerank_steps": (lambda v: v >= 0, "0 or more"),
    "rerank_queries": (lambda v: v >= 1, "at least 1"),
    "rerank_negatives": (lambda v: v >= 1, "at least 1"),
    "rerank_lr": (lambda v: v > 0, "positive"),
    "rerank_top_k": (lambda v: v >= 2, "at least 2"),
    "pool_size": (lambda v: v >= 2, "at least 2"),
    "ckpt_every": (lambda v: v >= 1, "at least 1")}


def get_args(argv):
    p = argparse.ArgumentParser(prog="finetune.py", description="Fine-tune ModernBERT for code "
                                "search (docstring -> function); compare with BM25, zero-shot "
                                "and hybrids on held-out files and on unseen packages.")
    p.add_argument("--init_from", metavar="PATH", help="our ckpt.pt, its directory, a run "
                   "directory (newest phase), or a Hugging Face ModernBERT directory (default: "
                   f"newest {DEFAULT_RUN_DIR}/phase*/ckpt.pt)")
    p.add_argument("--compare", metavar="PATH", action="append", default=[],
                   help="another model, fine-tuned the same way into OUT/compareN and added to "
                        "the table; repeatable")
    p.add_argument("--data", default="data/stdlib", help="prepare.py's output, whose split picks "
                   "the files (default: %(default)s)")
    p.add_argument("--out", default="out/finetune", help="ckpt.pt, tokenizer.json, hf/, "
                   "rerank/, results.json (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue OUT/ckpt.pt (a finished one is only evaluated)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if OUT/ckpt.pt exists")
    setting_flags(p, DEFAULTS, SETTING_HELP, {"pool": ["mean", "cls"],
                                              "loss": ["one-way", "symmetric"]})
    setting_flags(p, RERANK_DEFAULTS, RERANK_HELP, title="the cross-encoder reranker")
    g = p.add_argument_group("the second test set and running")
    g.add_argument("--packages", default=",".join(PACKAGES),
                   help="installed distributions whose sources are the second test set, or "
                        "'none' (default: %(default)s, pinned in requirements.txt)")
    g.add_argument("--pool_size", type=int, default=POOL,
                   help="candidates per query in the second test set (default: %(default)s)")
    g.add_argument("--pools", type=int, default=1,
                   help="pools of the second test set scored, at most; the pool after them is "
                        "its dev pool, never scored (default: %(default)s)")
    g.add_argument("--ckpt_every", type=int, default=100,
                   help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast; auto: where a bf16 matmul measures faster "
                        "(default: %(default)s)")
    g.add_argument("--device", type=device_flag, help="default: cuda, else mps, else cpu")
    g = p.add_argument_group("several seeds, from finished runs (nothing is trained)")
    g.add_argument("--seeds_of", nargs="+", metavar="RUN",
                   help="finetune.py --out directories of one model's seeds: each system's "
                        "mean MRR@10 with its 95%% t interval over them, and the seed-averaged "
                        "paired bootstrap against BM25")
    g.add_argument("--against", nargs="+", metavar="RUN", default=[],
                   help="another model's seeds, alike: --seeds_of minus --against, paired")
    args = p.parse_args(argv)
    if args.against and not args.seeds_of:
        p.error("--against compares with --seeds_of: give both")
    for key, (ok, want) in CHECKS.items():
        value = getattr(args, key)
        if value is not None and not (math.isfinite(value) and ok(value)):
            p.error(f"--{key} must be {want}, got {value}")
    if args.pools < 1:
        p.error(f"--pools must be at least 1, got {args.pools}")
    if args.resume and args.overwrite:
        p.error("--resume continues a run, --overwrite starts it over: pick one")
    known = {d.lower(): m for d, m in PACKAGES.items()}
    names = [] if args.packages == "none" else [n.strip() for n in args.packages.split(",")]
    args.packages = {n: known.get(n.lower(), n.replace("-", "_")) for n in names if n}
    return args


def interval(row, reference, set_name):
    if row is reference:
        return ""
    d = row["paired"][set_name]
    return f"{d['diff']:+.3f} ({d['lo']:+.3f} to {d['hi']:+.3f})"


def markdown_table(rows, set_names):
    head = " | ".join(f"{n} MRR@10 | {n} vs BM25 (95%) | {n} R@10" for n in set_names)
    lines = [f"| system | {head} | seconds |", "|---" * (2 + 3 * len(set_names)) + "|"]
    for r in rows:
        cells = " | ".join(f"{r['sets'][n]['metrics']['MRR@10']:.3f} | {interval(r, rows[0], n)} "
                           f"| {r['sets'][n]['metrics']['R@10']:.3f}" for n in set_names)
        lines.append(f"| {r['name']} | {cells} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def seeds_table(runs, against=()):
    """Seeds of one model (finetune.py --out directories), optionally against another model's
    seeds -> markdown: per system and test set, the mean MRR@10 over seeds with its 95% t
    interval, and the paired bootstrap of the seeds' mean reciprocal rank per query against BM25
    (and against the other model's same system). Runs must share their systems and queries."""
    def loaded(paths):
        results = []
        for path in paths:
            file = os.path.join(path, "results.json")
            if not os.path.isfile(file):
                raise ValueError(f"{file} not found: a finished finetune.py --out directory")
            with open(file) as f:
                results.append(json.load(f))
        return results
    mine, theirs = loaded(runs), loaded(against)
    shape = [[(row["name"] == "BM25", {n: len(v["ranks"]) for n, v in row["sets"].items()})
              for row in r["rows"]] for r in mine + theirs]                # systems, queries
    if any(s != shape[0] for s in shape):
        raise ValueError("the runs do not score the same systems on the same test sets")
    set_names = sorted(mine[0]["rows"][0]["sets"])

    def ranks(results, i, name):  # (seeds, n_queries)
        return torch.tensor([r["rows"][i]["sets"][name]["ranks"] for r in results])

    def paired(a, b):
        d = cs.paired_bootstrap(a, b)
        return f"{d['diff']:+.3f} ({d['lo']:+.3f} to {d['hi']:+.3f})"

    other = " | first - second (95%)" if theirs else ""
    lines = [f"| system | test set | MRR@10, mean (95% over {len(mine)} seeds) | per seed | "
             f"vs BM25, seed-averaged (95%){other} |", "|---" * (5 + bool(theirs)) + "|"]
    for i, row in enumerate(mine[0]["rows"]):
        for name in set_names:
            mrr = [r["rows"][i]["sets"][name]["metrics"]["MRR@10"] for r in mine]
            low, high = mean_interval(mrr) if len(mrr) > 1 else (mrr[0], mrr[0])
            cells = [row["name"], name, f"{np.mean(mrr):.3f} ({low:.3f}-{high:.3f})",
                     ", ".join(f"{m:.3f}" for m in mrr)]
            if i > 0:  # BM25 is row 0 in every run
                cells.append(paired(ranks(mine, i, name), ranks(mine, 0, name)))
                if theirs:
                    cells.append(paired(ranks(mine, i, name), ranks(theirs, i, name)))
            else:
                cells += [""] * (1 + bool(theirs))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    began = time.perf_counter()
    args = get_args(argv)
    with one_line_errors("finetune.py"):
        if args.seeds_of:
            return print(seeds_table(args.seeds_of, args.against))
        return run_all(args, began)


def run_all(args, began):
    """Every check first (paths, data, models, checkpoints), so bad input writes nothing; then
    BM25, and each model before and after fine-tuning with its hybrids and reranker, in one
    table per test set."""
    device = pick_device(args.device or "auto")
    sources = [find_model(path) for path in [args.init_from, *args.compare]]
    load_meta(args.data)  # "run prepare.py first"
    out_dirs = [args.out] + [os.path.join(args.out, f"compare{k}") for k in range(1, len(sources))]
    runs = [planned_run(args, DEFAULTS, source, out_dir, "finetune.py")
            for source, out_dir in zip(sources, out_dirs)]
    reranks = []
    for source, out_dir in zip(sources, out_dirs):
        plan = planned_run(args, RERANK_DEFAULTS, source, os.path.join(out_dir, "rerank"),
                           "finetune.py")
        reranks.append(plan if plan[0]["rerank_steps"] else None)
    splits = load_pairs(args.data, runs[0][0]["min_query_words"])
    sets = {"dev": [splits["dev"]], "stdlib": [splits["test"]]}
    versions = {}
    if args.packages:
        pools, versions = package_pairs(args.packages, runs[0][0]["min_query_words"],
                                        args.pool_size, args.pools + 1)
        if len(pools) < 2:
            raise ValueError(f"the packages give one pool of {args.pool_size}: it takes two, one "
                             "to score and the packages' dev pool (a smaller --pool_size?)")
        scored = pools[:min(args.pools, len(pools) - 1)]
        sets["packages"], sets["packages-dev"] = scored, [pools[len(scored)]]
    for source, (settings, _) in zip(sources, runs):
        context = load_model(source, "cpu")[0].config.max_seq_len
        if max(settings["max_query_tokens"], settings["max_doc_tokens"]) > context:
            raise ValueError(f"--max_doc_tokens/--max_query_tokens exceed {source}'s context of "
                             f"{context}")
        if settings["batch_size"] > len(splits["train"]):
            raise ValueError(f"--batch_size {settings['batch_size']} is more than the "
                             f"{len(splits['train'])} training pairs")
    bf16 = speed_setup(device, args.dtype, "off")[0]
    print(f"{len(splits['train'])} training pairs, {len(splits['dev'])} dev pairs, "
          f"{len(splits['test'])} stdlib test pairs (each query ranks all of them)"
          + (f", {sum(map(len, sets['packages']))} package test pairs in pools of "
             f"{args.pool_size} and a dev pool" if args.packages else "")
          + f"; {device}, {'bf16 autocast' if bf16 else 'fp32'}")

    start = time.perf_counter()
    bm25 = {name: [cs.bm25_scores([p["query"] for p in pool], [p["code"] for p in pool])
                   for pool in pools] for name, pools in sets.items()}
    tests = reported_sets(sets)
    rows = [system_row("BM25", {n: bm25[n] for n in tests}, time.perf_counter() - start)]
    for source, (settings, resumed), out_dir, plan in zip(sources, runs, out_dirs, reranks):
        rows += model_rows(source, settings, resumed, out_dir, plan, splits, sets, bm25, device,
                           bf16, args.ckpt_every)
    for row in rows[1:]:  # each system against BM25, on the same queries
        row["paired"] = {n: cs.paired_bootstrap(row["sets"][n]["ranks"],
                                                rows[0]["sets"][n]["ranks"]) for n in tests}
    write_results(args, rows, splits, sets, tests, versions, bf16, began)
    return rows


def write_results(args, rows, splits, sets, tests, versions, bf16, began):
    """OUT/results.json (every row, its per-query ranks included) and the tables, printed."""
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "results.json"),
               {"train_pairs": len(splits["train"]), "dev_pairs": len(splits["dev"]),
                "packages_dev_pairs": sum(map(len, sets.get("packages-dev", []))),
                "test_pairs": {n: sum(map(len, sets[n])) for n in tests},
                "pool_size": {n: len(sets[n][0]) for n in tests}, "packages": versions,
                "bf16": bf16, "rows": rows, "wall_seconds": time.perf_counter() - began})
    print("\n" + markdown_table(rows, tests))
    for row in rows:
        if "dev" in row:
            print(f"{row['name']}: dev MRR@10 {row['dev']['MRR@10']:.3f} ({len(splits['dev'])} "
                  "dev queries, which choose settings)")
    print(f"\nvs BM25: the MRR@10 difference on the same queries, with its paired bootstrap 95% "
          f"interval. seconds: BM25 indexing and scoring; zero-shot: embedding; fine-tuned: "
          f"training and embedding. Wall time {time.perf_counter() - began:.0f} s in all -> "
          f"{args.out}/")


if __name__ == "__main__":
    main()
