"""
Put a trained ModernBERT to work: fill in [MASK] tokens, or embed texts.

    python sample.py                                       # newest out/phase*/ckpt.pt, built-in prompts
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
import glob
import os
import sys

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from modernbert import Config, ModernBERT, cu_seqlens_of
from train import load_checkpoint, pick_device

DEFAULT_RUN_DIR = "out"
# For the default corpus, Python's standard library. Each [MASK] hides one token of the stdlib
# tokenizer; [MASK] swallows the space before it, so "in [MASK](" asks for the token " range".
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


def fail(message):
    """Bad input: one line `sample.py: error: ...`, exit status 1, no traceback. (The loaders,
    which other scripts share, raise ValueError instead; main() reports it the same way.)"""
    raise SystemExit(f"sample.py: error: {message}")


def token_text(tokenizer, token_id):
    # The embedding has a few more rows than the tokenizer has tokens (a multiple of 64).
    return tokenizer.decode([token_id], skip_special_tokens=False) or f"<unused {token_id}>"


def describe(i, text):
    return f"prompt {i} ({text if len(text) <= 40 else text[:37] + '...'!r})"


# ----------------------------------------------------------------------------- loading

def newest_checkpoint(run_dir):
    ckpts = glob.glob(os.path.join(run_dir, "phase*", "ckpt.pt"))
    if not ckpts:
        raise ValueError(f"no checkpoint in {run_dir}/phase*/ckpt.pt: run `python train.py --phase 1` "
                          "first, or pass --init_from")
    return max(ckpts, key=os.path.getmtime)


def find_model(path=None):
    """What to load for --init_from PATH: a ckpt.pt file, or a Hugging Face directory."""
    if path is None:
        return newest_checkpoint(DEFAULT_RUN_DIR)
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    if not os.path.isdir(path):
        return path
    if os.path.isfile(os.path.join(path, "ckpt.pt")):
        return os.path.join(path, "ckpt.pt")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if glob.glob(os.path.join(path, "phase*", "ckpt.pt")):
        return newest_checkpoint(path)
    raise ValueError(f"{path!r} is not a model: expected a ckpt.pt, a directory holding one, or a Hugging "
                      "Face directory with config.json, model.safetensors and tokenizer.json")


def load_tokenizer(path, vocab_size):
    if not os.path.isfile(path):
        raise ValueError(f"no tokenizer.json beside the model: {path!r} is missing")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception for a broken file
        raise ValueError(f"cannot read tokenizer {path!r}: {e}")
    tokenizer.no_truncation()  # a tokenizer.json may carry its own truncation or padding settings
    tokenizer.no_padding()
    ids = {name: tokenizer.token_to_id(f"[{name.upper()}]") for name in ("cls", "sep", "pad", "mask")}
    if ids["cls"] is None or ids["sep"] is None:
        raise ValueError(f"tokenizer {path!r} has no [CLS] or [SEP] token, which every text starts and ends with")
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if largest >= vocab_size:
        raise ValueError(f"tokenizer {path!r} has ids up to {largest}, but the model's vocabulary ends at "
                          f"{vocab_size - 1}: they do not belong together")
    return tokenizer, ids


def load_model(path=None, device=None):
    """(model, tokenizer, special ids) from our checkpoint or a Hugging Face directory; the ids
    ("cls", "sep", "pad", "mask") come from the tokenizer, "mask" is None if it has none."""
    path = find_model(path)
    if os.path.isdir(path):  # Hugging Face format
        try:
            model = ModernBERT.from_pretrained(path)
        except Exception as e:  # missing files, foreign configs and tensors: all mean "not a model"
            raise ValueError(f"{path!r} is not a ModernBERT model ({type(e).__name__}: {e})")
        tokenizer_path = os.path.join(path, "tokenizer.json")
    else:
        ckpt = load_checkpoint(path)  # train.py's reader: tensors and plain containers only
        try:
            model = ModernBERT(Config(**ckpt["config"]))
            model.load_state_dict(ckpt["model"])
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"{path!r} does not fit this modernbert.py: {e}")
        tokenizer_path = os.path.join(os.path.dirname(path), "tokenizer.json")
    tokenizer, ids = load_tokenizer(tokenizer_path, model.config.vocab_size)
    return model.to(pick_device(device or "auto")).eval(), tokenizer, ids


# ----------------------------------------------------------------------------- running the model

def encode(tokenizer, texts):
    """Token ids of each text as [CLS] ... [SEP], the layout the model was trained on."""
    for i, text in enumerate(texts, 1):
        if not text.strip():
            fail(f"prompt {i} is empty")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    seqs = [e.ids for e in tokenizer.encode_batch(texts)]
    # Our tokenizer and the released one both wrap a text; one without that post-processor does not.
    return [ids if ids[:1] == [cls] else [cls, *ids, sep] for ids in seqs]


def fit(seqs, texts, context, truncate, sep):
    """Checks every sequence against the model's context; --truncate keeps the start of a long one."""
    for i, (ids, text) in enumerate(zip(seqs, texts), 1):
        if len(ids) > context and not truncate:
            fail(f"{describe(i, text)} is {len(ids)} tokens, longer than the model's context "
                              f"of {context}; pass --truncate to keep its first {context} tokens")
    return [ids if len(ids) <= context else ids[:context - 1] + [sep] for ids in seqs]


def packs(lengths, max_tokens):
    """Runs of consecutive sequences of at most max_tokens tokens in all (a longer one goes alone)."""
    pack, size = [], 0
    for i, n in enumerate(lengths):
        if pack and size + n > max_tokens:
            yield pack
            pack, size = [], 0
        pack.append(i)
        size += n
    if pack:
        yield pack


def hidden_states(model, seqs):
    """Final hidden states of each sequence, from one forward over the sequences packed back to
    back: no padding, and cu_seqlens keeps each one from attending to the others."""
    device = model.tok_embeddings.weight.device
    lengths = [len(s) for s in seqs]
    tokens = torch.tensor([t for s in seqs for t in s], device=device)
    return model.encode(tokens, cu_seqlens=cu_seqlens_of(lengths, device)).split(lengths)


@torch.inference_mode()
def fill_mask(model, tokenizer, texts, top_k=5, one_by_one=False, truncate=False, batch_tokens=8192):
    """Predicts every [MASK] of every text. Returns, per text, {"text", "filled" (each mask
    replaced by its top token), "masks": [{"position", "step", "top": [(id, token, prob), ...]}]},
    masks in text order. By default all masks are predicted at once, from the prompt as given.
    one_by_one: the most confident mask (highest top-1 probability) is filled with its top token
    and the prompt runs again, until none is left; "top" is then from the step that filled it."""
    mask_id = tokenizer.token_to_id("[MASK]")
    if mask_id is None:
        fail("the tokenizer has no [MASK] token, so there is nothing to fill (try --embed)")
    seqs = encode(tokenizer, texts)
    for i, (ids, text) in enumerate(zip(seqs, texts), 1):
        if mask_id not in ids:
            fail(f"{describe(i, text)} has no [MASK] to fill")
    seqs = fit(seqs, texts, model.config.max_seq_len, truncate, tokenizer.token_to_id("[SEP]"))
    for i, (ids, text) in enumerate(zip(seqs, texts), 1):
        if mask_id not in ids:
            fail(f"{describe(i, text)}: every [MASK] lies past the {len(ids)} tokens kept by --truncate")

    results = [{"text": text, "ids": ids, "open": [p for p, t in enumerate(ids) if t == mask_id], "masks": []}
               for text, ids in zip(texts, seqs)]
    step = 0
    while todo := [r for r in results if r["open"]]:
        step += 1
        for pack in packs([len(r["ids"]) for r in todo], batch_tokens):
            pack = [todo[i] for i in pack]
            states = hidden_states(model, [r["ids"] for r in pack])
            rows = torch.cat([h[r["open"]] for h, r in zip(states, pack)])
            # Only the mask rows go through the vocabulary-sized head, as in training.
            probs = model.decoder(model.head(rows)).float().softmax(-1)
            top = probs.topk(min(top_k, probs.shape[-1]))
            counts = [len(r["open"]) for r in pack]
            for r, values, indices in zip(pack, top.values.cpu().split(counts), top.indices.cpu().split(counts)):
                # values, indices: (this prompt's open masks, k), best candidate first
                chosen = [values[:, 0].argmax().item()] if one_by_one else range(len(r["open"]))
                for j in chosen:
                    position = r["open"][j]
                    r["ids"][position] = indices[j, 0].item()
                    r["masks"].append({"position": position, "step": step, "top": [
                        (t, token_text(tokenizer, t), p) for t, p in zip(indices[j].tolist(), values[j].tolist())]})
                r["open"] = [p for j, p in enumerate(r["open"]) if j not in chosen]
    return [{"text": r["text"], "filled": tokenizer.decode(r["ids"][1:-1], skip_special_tokens=False),
             "masks": sorted(r["masks"], key=lambda m: m["position"])} for r in results]


@torch.inference_mode()
def embed(model, tokenizer, texts, pool="mean", truncate=False, batch_tokens=8192):
    """(n_texts, d_model) float32 embeddings: the mean of each text's final hidden states over
    its tokens ([CLS] and [SEP] included, like sentence-transformers' mask-weighted mean), or
    its [CLS] row. Packed inputs hold no padding, so no pad token can leak into the mean."""
    seqs = encode(tokenizer, texts)
    seqs = fit(seqs, texts, model.config.max_seq_len, truncate, tokenizer.token_to_id("[SEP]"))
    rows = []
    for pack in packs([len(s) for s in seqs], batch_tokens):
        for h in hidden_states(model, [seqs[i] for i in pack]):
            rows.append(h.float().mean(0) if pool == "mean" else h[0].float())
    return torch.stack(rows).cpu()


def cosine_matrix(embeddings):
    unit = F.normalize(embeddings, dim=-1)
    return unit @ unit.T


# ----------------------------------------------------------------------------- code search

DEFAULT_SEARCH_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "modernbert_search.pt")


def python_files(directory):
    """The *.py files under directory (or directory itself, a file), hidden folders skipped."""
    if os.path.isfile(directory):
        return [directory]
    if not os.path.isdir(directory):
        raise ValueError(f"cannot read --in {directory!r}: no such file or directory")
    found = []
    for folder, subfolders, files in os.walk(directory):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # .git, .venv and the like
        found += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return found


def function_embeddings(model, tokenizer, model_path, files, pool, cache_path, batch_tokens):
    """([(file, name, line)], (n_functions, d_model) embeddings) of every function in files, each
    embedded from its whole source, docstring included. cache_path keeps them per file, keyed by
    the model and the file's mtime and size, so a second search embeds only what changed."""
    from finetune import DEFAULTS, code_functions, embed_texts  # not at the top: finetune imports sample
    model_key = f"{os.path.abspath(model_path)}:{os.stat(model_path).st_mtime_ns}:{pool}"
    cache = {"model": model_key, "files": {}}
    if cache_path and os.path.exists(cache_path):
        try:
            old = torch.load(cache_path, weights_only=True)
            cache = old if old.get("model") == model_key else cache
        except Exception:  # a broken cache is rebuilt, not an error
            pass
    todo, fresh = [], {}
    for path in files:
        key, st = os.path.abspath(path), os.stat(path)
        if cache["files"].get(key, {}).get("stamp") == [st.st_mtime_ns, st.st_size]:
            fresh[key] = cache["files"][key]
            continue
        try:
            with open(path, encoding="utf-8") as f:
                functions = code_functions(f.read()) or []  # None: not Python that parses
        except (OSError, UnicodeDecodeError):  # not text we can read: no functions to find there
            functions = []
        fresh[key] = {"stamp": [st.st_mtime_ns, st.st_size], "functions": [[f["name"], f["line"]] for f in functions],
                      "embeddings": torch.zeros(0)}
        todo += [(key, f["code"]) for f in functions]
    if todo:
        embeddings = embed_texts(model, tokenizer, [code for _, code in todo], DEFAULTS["max_doc_tokens"], pool,
                                 batch_tokens=batch_tokens, desc="embedding functions")
        for key in {k for k, _ in todo}:
            fresh[key]["embeddings"] = embeddings[[i for i, (k, _) in enumerate(todo) if k == key]]
    found = [(key, name, line) for key in fresh for name, line in fresh[key]["functions"]]
    if not found:
        raise ValueError(f"no Python functions in the {len(files)} *.py files of --in")
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        from train import save_checkpoint  # atomic: tmp, fsync, rename
        save_checkpoint(cache_path, {"model": model_key, "files": fresh})
    return found, torch.cat([fresh[key]["embeddings"] for key in fresh if fresh[key]["functions"]])


def search_code(model, tokenizer, model_path, directory, query, top_k=5, pool="mean", cache_path=None,
                batch_tokens=8192):
    """The top_k functions of the *.py files under directory (hidden folders skipped) for a query,
    best first: (cosine, file, line, name)."""
    from finetune import DEFAULTS, embed_texts
    if not query.strip():
        raise ValueError("--search is empty")
    found, docs = function_embeddings(model, tokenizer, model_path, python_files(directory), pool, cache_path,
                                      batch_tokens)                             # docs: (n_functions, d_model)
    q = embed_texts(model, tokenizer, [query], DEFAULTS["max_query_tokens"], pool, batch_tokens=batch_tokens)
    scores = (F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).T)[0]         # (n_functions,)
    top = scores.topk(min(top_k, len(found)))
    return [(score, os.path.relpath(found[i][0]), found[i][2], found[i][1])
            for score, i in zip(top.values.tolist(), top.indices.tolist())]


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
            fail(f"cannot read --file {args.file!r}: {e}")
        prompts = [line for line in lines if line.strip()]  # blank lines separate, they are not prompts
        if not prompts:
            fail(f"--file {args.file!r} holds no prompts")
        texts += prompts
    return texts


def show(text, width=200):
    text = text.replace("\n", "\\n")  # one line per prompt
    return text if len(text) <= width else text[:width - 3] + "..."


def get_args(argv):
    parser = argparse.ArgumentParser(prog="sample.py", description="Fill [MASK] tokens with a trained ModernBERT, or embed texts.")
    parser.add_argument("--init_from", metavar="PATH", help="ckpt.pt, its directory, a run directory, or a Hugging "
                        f"Face ModernBERT directory (default: newest {DEFAULT_RUN_DIR}/phase*/ckpt.pt)")
    parser.add_argument("--text", action="append", help="a prompt; repeat for more")
    parser.add_argument("--file", metavar="F", help="prompts, one per line (blank lines skipped); - for stdin")
    parser.add_argument("--top_k", type=int, default=5, help="candidates shown per mask (default: %(default)s)")
    parser.add_argument("--one_by_one", action="store_true",
                        help="fill masks one at a time, most confident first, each seeing the ones before")
    parser.add_argument("--embed", action="store_true", help="print embeddings' cosine similarities instead")
    parser.add_argument("--pool", choices=["mean", "cls"], default="mean", help="embedding pooling (default: %(default)s)")
    parser.add_argument("--truncate", action="store_true", help="cut prompts longer than the context instead of failing")
    parser.add_argument("--batch_tokens", type=int, default=8192, help="tokens per forward pass (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda, else mps, else cpu")
    parser.add_argument("--search", metavar="QUERY", help="code search: the --top_k functions under --in for QUERY "
                        "(default model: out/finetune, finetune.py's output, if it exists)")
    parser.add_argument("--in", dest="search_in", metavar="DIR", help="--search looks at every *.py under DIR")
    parser.add_argument("--cache", default=DEFAULT_SEARCH_CACHE,
                        help="--search keeps function embeddings here, per file and mtime (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_tokens < 1:
        parser.error("--top_k and --batch_tokens must be at least 1")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if args.device and not available[args.device]:
        parser.error(f"--device {args.device} is not available on this machine")
    if args.embed and args.one_by_one:
        parser.error("--one_by_one fills masks; it does not go with --embed")
    if (args.search is None) != (args.search_in is None):
        parser.error("--search QUERY and --in DIR go together")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.search is not None:
        return search_main(args)

    texts = read_prompts(args) or (DEFAULT_EMBED_TEXTS if args.embed else DEFAULT_PROMPTS)
    try:
        path = find_model(args.init_from)
        model, tokenizer, ids = load_model(path, args.device)
    except ValueError as e:
        fail(e)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{path}: {c.n_layers} layers, d_model {c.d_model}, {n_params / 1e6:.1f}M parameters, context "
          f"{c.max_seq_len}; {model.tok_embeddings.weight.device.type}, {model.attention_backend} attention\n")
    if args.embed:
        embeddings = embed(model, tokenizer, texts, args.pool, args.truncate, args.batch_tokens)
        print(f"{args.pool}-pooled embeddings, {embeddings.shape[1]} dimensions:")
        for i, text in enumerate(texts, 1):
            print(f"  {i:>2}  {show(text)}")
        print("\ncosine similarity:")
        print("      " + "".join(f"{j:>7}" for j in range(1, len(texts) + 1)))
        for i, row in enumerate(cosine_matrix(embeddings).tolist(), 1):
            print(f"  {i:>2}  " + "".join(f"{x:7.3f}" for x in row))
        return embeddings
    if ids["mask"] is None:  # before the prompts, whose own errors would otherwise come first
        fail(f"the tokenizer of {path!r} has no [MASK] token, so there is nothing to fill (try --embed)")
    results = fill_mask(model, tokenizer, texts, args.top_k, args.one_by_one, args.truncate, args.batch_tokens)
    for r in results:
        print(show(r["text"]))
        print(f"  -> {show(r['filled'])}")
        for n, m in enumerate(r["masks"], 1):
            step = f" (step {m['step']})" if args.one_by_one else ""
            print(f"  [MASK] {n}{step}:  " + "   ".join(f"{token!r} {p:.3g}" for _, token, p in m["top"]))
        print()
    return results


def search_main(args):
    init_from = args.init_from
    if init_from is None and os.path.isfile(os.path.join("out", "finetune", "ckpt.pt")):
        init_from = os.path.join("out", "finetune")  # fine-tuned for search, so the better default
    try:
        python_files(args.search_in)  # a wrong --in fails before a model is loaded
        path = find_model(init_from)
        model, tokenizer, _ = load_model(path, args.device)
        hits = search_code(model, tokenizer, path, args.search_in, args.search, args.top_k, args.pool, args.cache,
                           args.batch_tokens)
    except ValueError as e:
        fail(e)
    print(f"{path}: the top {len(hits)} functions under {args.search_in} for {show(args.search, 80)!r}")
    for score, file, line, name in hits:
        print(f"  {score:6.3f}  {file}:{line}  {name}")
    return hits


if __name__ == "__main__":
    main()
