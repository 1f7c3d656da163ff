"""
Fine-tune a pretrained ModernBERT (or BERT-mode) model for sequence classification, and measure
it on code pretraining trained on but never labelled: what a standard-library function returns
(stdlib_returns.py builds the task from typeshed's stubs, and its baselines).

    python classify.py                              # newest out/phase*/ckpt.pt -> out/classify/
    python classify.py --baselines                  # the data and the baselines only (seconds)
    python classify.py --compare runs/ablate-1600k/bert     # another model, the same way, one table
    python classify.py --resume                     # continue an interrupted fine-tune exactly
    python classify.py --predict "def f(x):\n    return x > 0"     # label and probability

The head is transformers' ModernBertForSequenceClassification: pool the final states (the [CLS]
row, or the mean over the tokens: --pooling), then dense, GELU, LayerNorm (the MLM head's own
layers, which it starts from, as transformers does when it loads a ForMaskedLM checkpoint),
dropout, linear. A BERT-mode model gets BertForSequenceClassification's: the pooler (dense and
tanh on [CLS]), dropout, linear. Cross-entropy, StableAdamW with a short warmup and a linear
decay, early stopping on dev accuracy; test is scored once, with the best dev checkpoint.
OUT/ holds ckpt.pt (the best model, and where training stands), tokenizer.json, results.json
and hf/, which transformers' AutoModelForSequenceClassification loads as it is.
"""
import argparse
import math
import os
import shutil
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import stdlib_returns as task
from modernbert import Config, ModernBERT
from runtime import (DEFAULT_RUN_DIR, Classifier, autocast_for, device_flag, encode,
                     export_classifier, find_model, load_checkpoint, load_model, model_tokenizer,
                     one_line_errors, pick_device, planned_run, quiet_encoder, save_atomic,
                     setting_flags, speed_setup, token_budget_runs, truncated, write_json)
from train import make_optimizer

DEFAULTS = dict(epochs=4, batch_size=32, lr=3e-4, warmup=0.06, weight_decay=1e-5, pooling="cls",
                dropout=0.0, max_tokens=512, eval_every=60, patience=4, seed=1337)


@torch.inference_mode()
def predict(model, seqs, bf16=False, batch_tokens=16384):
    """(n_seqs, n_labels) float32 probabilities, in runs of at most batch_tokens tokens."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for run in token_budget_runs([len(s) for s in seqs], batch_tokens):
        with autocast_for(device, bf16):
            out.append(model([seqs[i] for i in run]).float().softmax(-1))
    model.train()
    return torch.cat(out).cpu()


# ----------------------------------------------------------------------------- fine-tuning

def lr_at_step(step, total, settings):
    """Linear warmup over the first `warmup` share of the steps, then linear decay to 0."""
    warmup = max(1, round(settings["warmup"] * total))
    return settings["lr"] * min((step + 1) / warmup, (total - step) / max(1, total - warmup))


def next_batch(position, n, n_items, seed):
    """The next n example indices of a seeded shuffle per epoch, and the position after them;
    an epoch's last examples that do not fill a batch wait for the next epoch's shuffle."""
    epoch, used = position
    if used + n > n_items:
        epoch, used = epoch + 1, 0
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    return order[used:used + n].tolist(), [epoch, used + n]


def finetune(model, data, settings, out_dir, state, bf16, ckpt_info):
    """Trains in place; every eval_every steps scores dev and keeps the best weights; stops after
    `patience` evals without a better dev accuracy, or after `epochs`. Each eval writes
    OUT/ckpt.pt atomically (an interrupt loses at most eval_every steps: --resume goes on from
    there exactly). Returns the state: best dev accuracy, its step and weights, the history."""
    seqs, labels = data["train"]
    total = settings["epochs"] * (len(seqs) // settings["batch_size"])
    optimizer = make_optimizer(model, settings["lr"], settings["weight_decay"])
    if state["optimizer"]:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    device = next(model.parameters()).device
    target = torch.tensor(labels, device=device)
    bar = tqdm(total=total, initial=state["step"], unit="step", dynamic_ncols=True,
               desc=f"fine-tuning {ckpt_info['init_from']}")
    model.train()
    while state["step"] < total and state["bad_evals"] < settings["patience"]:
        began = time.perf_counter()
        batch, state["position"] = next_batch(state["position"], settings["batch_size"],
                                              len(seqs), settings["seed"])
        torch.manual_seed(settings["seed"] * 1_000_003 + state["step"])  # dropout, resumable
        with autocast_for(device, bf16):
            logits = model([seqs[i] for i in batch])
        loss = F.cross_entropy(logits.float(), target[batch])
        if not math.isfinite(loss.item()):
            raise ValueError(f"loss is {loss.item()} at step {state['step'] + 1}; nothing saved "
                             "for it. Try a lower --lr")
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(state["step"], total, settings)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        bar.update(1)
        best = f"{state['best_dev']:.1%}" if state["history"] else "n/a"
        bar.set_postfix(loss=f"{loss.item():.3f}", best_dev=best,
                        ex_s=f"{len(batch) / (time.perf_counter() - began):.0f}")
        if state["step"] % settings["eval_every"] == 0 or state["step"] == total:
            dev = accuracy(model, data["dev"], bf16)
            state["history"].append({"step": state["step"], "loss": loss.item(), "dev": dev})
            better = dev > state["best_dev"]
            state.update(best_dev=max(dev, state["best_dev"]),
                         bad_evals=0 if better else state["bad_evals"] + 1)
            if better:
                state.update(best_step=state["step"], best={k: v.detach().clone()
                                                            for k, v in model.state_dict().items()})
            state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
            save_atomic(os.path.join(out_dir, "ckpt.pt"), {**ckpt_info, **state})
            tqdm.write(f"step {state['step']}: dev accuracy {dev:.2%}"
                       + (" (best so far)" if better else ""))
    bar.close()
    state["finished"] = True
    save_atomic(os.path.join(out_dir, "ckpt.pt"), {**ckpt_info, **state})
    return state


def accuracy(model, split, bf16):
    seqs, labels = split
    return float((predict(model, seqs, bf16).argmax(-1).numpy() == np.array(labels)).mean())


# ----------------------------------------------------------------------------- a trained classifier

def load_classifier(path, device=None):
    """(classifier, tokenizer, labels) from classify.py's ckpt.pt (the best dev weights)."""
    ckpt = load_checkpoint(path)
    if "labels" not in ckpt:
        raise ValueError(f"{path} is not a classify.py checkpoint (no labels in it)")
    try:
        encoder = ModernBERT(Config(**ckpt["config"]))
        model = Classifier(encoder, len(ckpt["labels"]), ckpt["pooling"])
        model.load_state_dict(ckpt["best"])
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{path} does not fit this classify.py / modernbert.py: {e}") from None
    tokenizer, _ = model_tokenizer(os.path.join(os.path.dirname(path), "tokenizer.json"),
                                   encoder.config.vocab_size)
    quiet_encoder(encoder)
    return model.to(pick_device(device or "auto")).eval(), tokenizer, ckpt["labels"]


# ----------------------------------------------------------------------------- main

SETTING_HELP = {
    "epochs": "passes over the train split at most (early stopping may end sooner)",
    "batch_size": "examples per step", "lr": "peak learning rate (StableAdamW)",
    "warmup": "share of the steps with a rising LR, then linear decay to 0",
    "weight_decay": "decoupled weight decay", "pooling": "cls: the [CLS] state; mean: all tokens "
    "(ModernBERT's classifier_pooling; BERT always pools [CLS])",
    "dropout": "before the last linear layer", "max_tokens": "functions are cut to this",
    "eval_every": "steps between dev evals", "patience": "evals without a better dev accuracy "
    "before stopping", "seed": "seed of the head's init, the data order and dropout"}
CHECKS = {"epochs": (1, None), "batch_size": (1, None), "lr": (0, "positive"),
          "warmup": (0, "[0, 1)"), "weight_decay": (0, None), "dropout": (0, "[0, 1)"),
          "max_tokens": (3, None), "eval_every": (1, None), "patience": (1, None)}


def get_args(argv):
    p = argparse.ArgumentParser(prog="classify.py", description="Fine-tune ModernBERT to predict "
                                "what a stdlib function returns; baselines in the same table.")
    add = p.add_argument
    add("--init_from", metavar="PATH", help="our ckpt.pt, its directory, a run directory, or a "
        f"Hugging Face directory (default: newest {DEFAULT_RUN_DIR}/phase*/ckpt.pt)")
    add("--compare", metavar="PATH", action="append", default=[],
        help="another model, fine-tuned the same way into OUT/compareN; repeatable")
    add("--data", default="data/stdlib", help="prepare.py's output: its val files are left out "
        "(default: %(default)s)")
    add("--out", default="out/classify", help="ckpt.pt, tokenizer.json, hf/, results.json "
        "(default: %(default)s)")
    add("--baselines", action="store_true", help="only the data summary and the baselines")
    add("--predict", metavar="TEXT", action="append",
        help="classify TEXT with OUT/ckpt.pt (\\n in TEXT is a newline); repeatable")
    add("--resume", action="store_true", help="continue OUT/ckpt.pt (a finished one: evaluated)")
    add("--overwrite", action="store_true", help="start over even if OUT/ckpt.pt exists")
    setting_flags(p, DEFAULTS, SETTING_HELP, {"pooling": ["cls", "mean"]})
    g = p.add_argument_group("the task and running")
    g.add_argument("--split_seed", type=int, default=task.DEFAULTS["seed"],
                   help="seed of the module split and the bootstrap (default: %(default)s)")
    g.add_argument("--bootstrap", type=int, default=task.DEFAULTS["bootstrap"],
                   help="resamples per 95%% interval (default: %(default)s)")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast; auto: where a bf16 matmul measures faster")
    g.add_argument("--device", type=device_flag, help="default: cuda, else mps, else cpu")
    args = p.parse_args(argv)
    for key, (low, rule) in CHECKS.items():
        value = getattr(args, key)
        if value is None:
            continue
        bad = (not math.isfinite(value) or value < low or (rule == "positive" and value <= 0)
               or (rule == "[0, 1)" and value >= 1))
        if bad:
            p.error(f"--{key} must be {rule or f'at least {low}'}, got {value}")
    if args.bootstrap < 100:
        p.error(f"--bootstrap must be at least 100, got {args.bootstrap}")
    if args.resume and args.overwrite:
        p.error("--resume continues a run, --overwrite starts it over: pick one")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a directory")
    if args.predict and (args.baselines or args.compare or args.resume or args.overwrite):
        p.error("--predict classifies with OUT/ckpt.pt; it takes no training flags")
    return args


def encoded(splits, tokenizer, max_tokens):
    """Each split as (token-id sequences cut to max_tokens, label indices)."""
    sep = tokenizer.token_to_id("[SEP]")
    return {name: (truncated(encode(tokenizer, [e["text"] for e in examples]), max_tokens, sep),
                   [task.CLASSES.index(e["label"]) for e in examples])
            for name, examples in splits.items()}


def run_one(source, out_dir, settings, resumed, splits, device, bf16):
    """One pretrained model: fine-tuned (or continued), then its best dev weights on test."""
    encoder, tokenizer, _ = load_model(source, device)
    torch.manual_seed(settings["seed"])
    model = Classifier(quiet_encoder(encoder), len(task.CLASSES), settings["pooling"],
                       settings["dropout"]).to(device)
    max_tokens = min(settings["max_tokens"], encoder.config.max_seq_len)
    if max_tokens < settings["max_tokens"]:  # learned positions (BERT) stop at the trained length
        tqdm.write(f"{source}: functions cut to its context of {max_tokens} tokens, not "
                   f"{settings['max_tokens']}")
    data = encoded(splits, tokenizer, max_tokens)
    os.makedirs(out_dir, exist_ok=True)
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    tokenizer_file = os.path.join(out_dir, "tokenizer.json")
    shutil.copy(os.path.join(folder, "tokenizer.json"), tokenizer_file)
    ckpt_info = dict(config=asdict(encoder.config), labels=task.CLASSES, init_from=source,
                     pooling=settings["pooling"], settings=settings)
    state = resumed or dict(step=0, position=[0, 0], best_dev=-1.0, best_step=0, bad_evals=0,
                            history=[], best=None, model=None, optimizer=None, finished=False)
    began = time.perf_counter()
    if not state["finished"]:
        state = finetune(model, data, settings, out_dir, state, bf16, ckpt_info)
    model.load_state_dict(state["best"])
    probs = predict(model, data["test"][0], bf16)
    export_classifier(model, out_dir, tokenizer_file, task.CLASSES)
    return {"best_dev": state["best_dev"], "best_step": state["best_step"],
            "steps": state["step"], "history": state["history"], "out": out_dir,
            "settings": settings, "seconds": time.perf_counter() - began,
            "predictions": [task.CLASSES[i] for i in probs.argmax(-1).tolist()]}


def main(argv=None):
    began = time.perf_counter()
    args = get_args(argv)
    with one_line_errors("classify.py"):
        if args.predict:
            return predict_main(args)
        return run_all(args, began)


def run_all(args, began):
    """Every check first (models, checkpoints, data), so bad input writes nothing; then the
    baselines and each model fine-tuned, in one table with paired intervals against TF-IDF."""
    device = pick_device(args.device or "auto")
    sources = [] if args.baselines else [find_model(p) for p in [args.init_from, *args.compare]]
    out_dirs = [args.out] + [os.path.join(args.out, f"compare{k}") for k in range(1, len(sources))]
    runs = [planned_run(args, DEFAULTS, s, d, "classify.py") for s, d in zip(sources, out_dirs)]
    for (_, resumed), out_dir in zip(runs, out_dirs):
        if resumed and "labels" not in resumed:
            raise ValueError(f"{out_dir}/ckpt.pt is not a classify.py checkpoint (no labels)")
    splits, info = task.load_data(args.data, args.split_seed, task.DEFAULTS["test_min"],
                                  task.DEFAULTS["dev_min"])
    print(task.data_summary(info), end="\n\n")
    rows, tfidf = task.baselines(splits, args.bootstrap, args.split_seed)
    bf16 = speed_setup(device, args.dtype, "off")[0]
    for source, out_dir, (settings, resumed) in zip(sources, out_dirs, runs):
        result = run_one(source, out_dir, settings, resumed, splits, device, bf16)
        gold = [e["label"] for e in splits["test"]]
        rows[f"{source}, fine-tuned"] = {"system": f"{source}, fine-tuned", **task.scores(
            gold, result["predictions"], args.bootstrap, args.split_seed), **result}
    gold = np.array([e["label"] for e in splits["test"]])
    reference, paired = "tfidf", {}
    for name, row in rows.items():
        if name != reference:
            a = np.array(row["predictions"]) == gold
            b = np.array(rows[reference]["predictions"]) == gold
            paired[f"{name} - {reference}"] = {
                "difference": float(a.mean() - b.mean()),
                "ci": task.paired_bootstrap(a, b, args.bootstrap, args.split_seed)}
    print(results_table(rows, paired, reference))
    results = {"settings": {k: v for k, v in vars(args).items()}, **info, "systems": rows,
               "tfidf": tfidf, "paired": paired, "bf16": bf16,
               "wall_seconds": time.perf_counter() - began}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "results.json.tmp"), results)
    os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
    print(f"\nwall time {time.perf_counter() - began:.0f} s -> {args.out}/results.json")
    return results


def results_table(rows, paired, reference):
    pct = lambda v: f"{100 * v:.1f}"
    lines = ["| system (test) | accuracy % | 95% CI | macro-F1 % | 95% CI | vs TF-IDF, paired |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        d = paired.get(f"{name} - {reference}")
        name = r["system"]
        vs = (f"{100 * d['difference']:+.1f} ({100 * d['ci'][0]:+.1f} to "
              f"{100 * d['ci'][1]:+.1f})" if d else "")
        lines.append(f"| {name} | {pct(r['accuracy'])} | {pct(r['accuracy_ci'][0])}-"
                     f"{pct(r['accuracy_ci'][1])} | {pct(r['macro_f1'])} | "
                     f"{pct(r['macro_f1_ci'][0])}-{pct(r['macro_f1_ci'][1])} | {vs} |")
    return "\n".join(lines)


def predict_main(args):
    path = os.path.join(args.out, "ckpt.pt")
    if not os.path.exists(path):
        raise ValueError(f"no classifier in {args.out}/: fine-tune one first (python classify.py "
                         f"--out {args.out})")
    model, tokenizer, labels = load_classifier(path, args.device)
    texts = [t.replace("\\n", "\n") for t in args.predict]
    for i, text in enumerate(texts, 1):
        if not text.strip():
            raise ValueError(f"--predict {i} is empty")
    seqs = truncated(encode(tokenizer, texts), model.encoder.config.max_seq_len,
                     tokenizer.token_to_id("[SEP]"))
    probs = predict(model, seqs)
    for text, p in zip(texts, probs):
        best = int(p.argmax())
        shown = text.replace("\n", "\\n")
        print(f"{labels[best]} {p[best]:.3f}  {shown if len(shown) <= 70 else shown[:67] + '...'}")
    return [(labels[int(p.argmax())], float(p.max())) for p in probs]


if __name__ == "__main__":
    main()
