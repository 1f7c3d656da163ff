"""
Put a trained ModernBERT to work: fill in [MASK] tokens, or embed texts.

    python sample.py                                 # newest out/phase*/ckpt.pt, built-in prompts
    python sample.py --text "for i in [MASK](len(items)):" --top_k 10
    python sample.py --file prompts.txt                    # one prompt per line; "-" reads stdin
    python sample.py --text "self.[MASK][MASK][MASK] = None" --one_by_one   # a whole identifier
    python sample.py --init_from ModernBERT-base --text "The capital of France is [MASK]."
    python sample.py --embed --text "def add(a, b):" --text "def plus(x, y):"   # cosine table
    python sample.py --search "read the whole file and return its contents" --in path/to/code

--init_from takes one of our checkpoints (a ckpt.pt, its directory, or a run directory such as
out/, whose newest phase is used) or a Hugging Face ModernBERT directory (config.json,
model.safetensors, tokenizer.json). The tokenizer always comes from beside the model, and the
special ids are read from that tokenizer, so a model never meets another model's ids.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from codesearch import DEFAULT_SEARCH_CACHE, MODES, load_reranker, python_files, search_code
from runtime import (DEFAULT_RUN_DIR, device_flag, embed, encode, find_model, load_model,
                     one_line_errors, packed_states, token_budget_runs, truncated)

# For the default corpus, Python's standard library. Each [MASK] hides one token of the stdlib
# tokenizer; [MASK] swallows the space before it, so "in [MASK](" asks for the token " range".
# --search's mode: the best of finetune.py's systems on both test sets (README, Code search)
DEFAULT_MODE = "hybrid"
DEFAULT_BM25_WEIGHT = 0.3  # what finetune.py chose on dev for the default model

DEFAULT_PROMPTS = [
    "for i in [MASK](len(items)):",
    "for key, value in kwargs.[MASK]():",
    "def __init__([MASK], name, value=None):",
    "if not [MASK](name, str):",
    "raise [MASK](f'unknown option: {name!r}')",
    '"""Return the [MASK] of items in the list."""',
    "for [MASK], line in enumerate(lines):",
    "try:\n    value = cache[key]\nexcept [MASK]:\n    return [MASK]",
]
DEFAULT_EMBED_TEXTS = [
    "def add(a, b):\n    return a + b",
    "def plus(x, y):\n    return x + y",
    "with open(path) as f:\n    data = f.read()",
    '"""Read the whole file and return its contents."""',
]


def token_text(tokenizer, token_id):
    # The embedding has a few more rows than the tokenizer has tokens (a multiple of 64).
    return tokenizer.decode([token_id], skip_special_tokens=False) or f"<unused {token_id}>"


def describe(i, text):
    return f"prompt {i} ({text if len(text) <= 40 else text[:37] + '...'!r})"


def prompt_ids(tokenizer, texts, context, truncate):
    """[CLS] ... [SEP] ids of each prompt; one longer than the model's context is an error,
    or with --truncate cut to its first `context` tokens (the [SEP] kept)."""
    for i, text in enumerate(texts, 1):
        if not text.strip():
            raise ValueError(f"prompt {i} is empty")
    seqs = encode(tokenizer, texts)
    for i, (ids, text) in enumerate(zip(seqs, texts), 1):
        if len(ids) > context and not truncate:
            raise ValueError(f"{describe(i, text)} is {len(ids)} tokens, longer than the model's "
                             f"context of {context}; pass --truncate to keep its first {context} "
                             "tokens")
    return truncated(seqs, context, tokenizer.token_to_id("[SEP]"))


@torch.inference_mode()
def fill_mask(model, tokenizer, texts, top_k=5, one_by_one=False, truncate=False,
              batch_tokens=8192):
    """Predicts every [MASK] of every text. Returns, per text, {"text", "filled" (each mask
    replaced by its top token), "masks": [{"position", "step", "top": [(id, token, prob), ...]}]},
    masks in text order. By default all masks are predicted at once, from the prompt as given.
    one_by_one: the most confident mask (highest top-1 probability) is filled with its top token
    and the prompt runs again, until none is left; "top" is then from the step that filled it."""
    mask_id = tokenizer.token_to_id("[MASK]")
    if mask_id is None:
        raise ValueError("the tokenizer has no [MASK] token, so there is nothing to fill "
                         "(try --embed)")
    for i, text in enumerate(texts, 1):
        if not text.strip():
            raise ValueError(f"prompt {i} is empty")
    for i, (ids, text) in enumerate(zip(encode(tokenizer, texts), texts), 1):
        if mask_id not in ids:
            raise ValueError(f"{describe(i, text)} has no [MASK] to fill")
    seqs = prompt_ids(tokenizer, texts, model.config.max_seq_len, truncate)
    for i, (ids, text) in enumerate(zip(seqs, texts), 1):
        if mask_id not in ids:
            raise ValueError(f"{describe(i, text)}: every [MASK] lies past the {len(ids)} tokens "
                             "kept by --truncate")

    results = [{"text": text, "ids": ids, "open": [p for p, t in enumerate(ids) if t == mask_id],
                "masks": []} for text, ids in zip(texts, seqs)]
    step = 0
    while todo := [r for r in results if r["open"]]:
        step += 1
        for run in token_budget_runs([len(r["ids"]) for r in todo], batch_tokens):
            run = [todo[i] for i in run]
            states, cu_seqlens = packed_states(model, [r["ids"] for r in run])
            starts = cu_seqlens[:-1].tolist()
            rows = states[[start + p for r, start in zip(run, starts) for p in r["open"]]]
            # Only the mask rows go through the vocabulary-sized head, as in training.
            probs = model.decoder(model.head(rows)).float().softmax(-1)
            top = probs.topk(min(top_k, probs.shape[-1]))
            counts = [len(r["open"]) for r in run]
            for r, values, indices in zip(run, top.values.cpu().split(counts),
                                          top.indices.cpu().split(counts)):
                # values, indices: (this prompt's open masks, k), best candidate first
                chosen = [values[:, 0].argmax().item()] if one_by_one else range(len(r["open"]))
                for j in chosen:
                    position = r["open"][j]
                    r["ids"][position] = indices[j, 0].item()
                    r["masks"].append({"position": position, "step": step, "top": [
                        (t, token_text(tokenizer, t), p)
                        for t, p in zip(indices[j].tolist(), values[j].tolist())]})
                r["open"] = [p for j, p in enumerate(r["open"]) if j not in chosen]
    return [{"text": r["text"], "filled": tokenizer.decode(r["ids"][1:-1],
                                                         skip_special_tokens=False),
             "masks": sorted(r["masks"], key=lambda m: m["position"])} for r in results]


def embed_prompts(model, tokenizer, texts, pool="mean", truncate=False, batch_tokens=8192):
    """(n_texts, d_model) float32 embeddings of whole prompts (runtime.embed, the one embedding
    path), after the same length check as fill-mask."""
    prompt_ids(tokenizer, texts, model.config.max_seq_len, truncate)
    return embed(model, tokenizer, texts, model.config.max_seq_len, pool,
                 batch_tokens=batch_tokens)


def cosine_matrix(embeddings):
    unit = F.normalize(embeddings, dim=-1)
    return unit @ unit.T


# ----------------------------------------------------------------------------- main

def read_prompts(args):
    texts = list(args.text or [])
    if args.file:
        try:
            if args.file == "-":
                lines = sys.stdin.read().splitlines()
            else:
                with open(args.file, encoding="utf-8") as f:
                    lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --file {args.file!r}: {e}")
        prompts = [line for line in lines if line.strip()]  # blank lines separate prompts
        if not prompts:
            raise ValueError(f"--file {args.file!r} holds no prompts")
        texts += prompts
    return texts


def show(text, width=200):
    text = text.replace("\n", "\\n")  # one line per prompt
    return text if len(text) <= width else text[:width - 3] + "..."


def get_args(argv):
    parser = argparse.ArgumentParser(prog="sample.py", description="Fill [MASK] tokens with a "
                                     "trained ModernBERT, or embed texts.")
    add = parser.add_argument
    add("--init_from", metavar="PATH", help="ckpt.pt, its directory, a run directory, or a "
        f"Hugging Face ModernBERT directory (default: newest {DEFAULT_RUN_DIR}/phase*/ckpt.pt)")
    add("--text", action="append", help="a prompt; repeat for more")
    add("--file", metavar="F", help="prompts, one per line (blank lines skipped); - for stdin")
    add("--top_k", type=int, default=5, help="candidates shown per mask (default: %(default)s)")
    add("--one_by_one", action="store_true",
        help="fill masks one at a time, most confident first, each seeing the ones before")
    add("--embed", action="store_true", help="print embeddings' cosine similarities instead")
    add("--pool", choices=["mean", "cls"], default="mean",
        help="embedding pooling (default: %(default)s)")
    add("--truncate", action="store_true",
        help="cut prompts longer than the context instead of failing")
    add("--batch_tokens", type=int, default=8192,
        help="tokens per forward pass (default: %(default)s)")
    add("--device", type=device_flag, help="default: cuda, else mps, else cpu")
    add("--search", metavar="QUERY", help="code search: the --top_k functions under --in for "
        "QUERY (default model: out/finetune, finetune.py's output, if it exists)")
    add("--in", dest="search_in", metavar="DIR", help="--search looks at every *.py under DIR")
    add("--mode", choices=MODES, default=DEFAULT_MODE,
        help="--search by bm25, the dense model, their hybrid (a weighted sum of standardized "
        "scores, the weight finetune.py chose on dev), or the cross-encoder over BM25's top 20 "
        "(finetune.py's OUT/rerank); the default is the best measured (README, Code search) "
        "(default: %(default)s)")
    add("--cache", default=DEFAULT_SEARCH_CACHE, help="--search keeps function embeddings here, "
        "per file and mtime (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_tokens < 1:
        parser.error("--top_k and --batch_tokens must be at least 1")
    if args.embed and args.one_by_one:
        parser.error("--one_by_one fills masks; it does not go with --embed")
    if (args.search is None) != (args.search_in is None):
        parser.error("--search QUERY and --in DIR go together")
    return args


def main(argv=None):
    args = get_args(argv)
    with one_line_errors("sample.py"):
        if args.search is not None:
            return search_main(args)
        texts = read_prompts(args) or (DEFAULT_EMBED_TEXTS if args.embed else DEFAULT_PROMPTS)
        path = find_model(args.init_from)
        model, tokenizer, ids = load_model(path, args.device)
        config, n_params = model.config, sum(p.numel() for p in model.parameters())
        print(f"{path}: {config.n_layers} layers, d_model {config.d_model}, {n_params / 1e6:.1f}M "
              f"parameters, context {config.max_seq_len}; "
              f"{model.tok_embeddings.weight.device.type}, "
              f"{model.attention_backend} attention\n")
        if args.embed:
            return embed_main(args, model, tokenizer, texts)
        if ids["mask"] is None:  # before the prompts, whose own errors would otherwise come first
            raise ValueError(f"the tokenizer of {path!r} has no [MASK] token, so there is "
                             "nothing to fill (try --embed)")
        results = fill_mask(model, tokenizer, texts, args.top_k, args.one_by_one, args.truncate,
                            args.batch_tokens)
        for r in results:
            print(show(r["text"]))
            print(f"  -> {show(r['filled'])}")
            for n, m in enumerate(r["masks"], 1):
                step = f" (step {m['step']})" if args.one_by_one else ""
                print(f"  [MASK] {n}{step}:  "
                      + "   ".join(f"{token!r} {p:.3g}" for _, token, p in m["top"]))
            print()
        return results


def embed_main(args, model, tokenizer, texts):
    embeddings = embed_prompts(model, tokenizer, texts, args.pool, args.truncate,
                               args.batch_tokens)
    print(f"{args.pool}-pooled embeddings, {embeddings.shape[1]} dimensions:")
    for i, text in enumerate(texts, 1):
        print(f"  {i:>2}  {show(text)}")
    print("\ncosine similarity:")
    print("      " + "".join(f"{j:>7}" for j in range(1, len(texts) + 1)))
    for i, row in enumerate(cosine_matrix(embeddings).tolist(), 1):
        print(f"  {i:>2}  " + "".join(f"{x:7.3f}" for x in row))
    return embeddings


def chosen_weight(model_path):
    """The hybrid's BM25 weight: the one finetune.py chose on its dev split for this model (its
    results.json), else DEFAULT_BM25_WEIGHT."""
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    try:
        with open(os.path.join(folder, "results.json")) as f:
            rows = json.load(f)["rows"]
        return next(r["weight"] for r in rows if "weight" in r)
    except (OSError, ValueError, KeyError, StopIteration):
        return DEFAULT_BM25_WEIGHT


def search_main(args):
    init_from = args.init_from
    if init_from is None and os.path.isfile(os.path.join("out", "finetune", "ckpt.pt")):
        init_from = os.path.join("out", "finetune")  # fine-tuned for search: the better default
    python_files(args.search_in)  # a wrong --in fails before a model is loaded
    model = tokenizer = path = reranker = None
    top_k_reranked = 20
    if args.mode in ("dense", "hybrid"):
        path = find_model(init_from)
        model, tokenizer, _ = load_model(path, args.device)
    elif args.mode == "rerank":
        path = os.path.join(init_from or os.path.join("out", "finetune"), "rerank")
        if not os.path.isfile(os.path.join(path, "ckpt.pt")):
            raise ValueError(f"no cross-encoder in {path}/ckpt.pt: run `python finetune.py "
                             "--rerank_steps 300` first, or pick another --mode")
        reranker, tokenizer, settings = load_reranker(path, args.device)
        top_k_reranked = settings["rerank_top_k"]
    weight = chosen_weight(path) if args.mode == "hybrid" else None
    hits = search_code(args.search_in, args.search, args.mode, model, tokenizer, path, reranker,
                       args.top_k, args.pool, args.cache, args.batch_tokens, top_k_reranked,
                       weight)
    how = f"{args.mode}, BM25 weight {weight:.1f}" if weight is not None else args.mode
    print(f"{path or 'BM25'} ({how}): the top {len(hits)} functions under "
          f"{args.search_in} for {show(args.search, 80)!r}")
    for score, file, line, name in hits:
        print(f"  {score:6.3f}  {file}:{line}  {name}")
    return hits


if __name__ == "__main__":
    main()
