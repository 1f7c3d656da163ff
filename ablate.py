"""
What each of ModernBERT's changes buys, measured.

The ladder: BERT (its architecture and its recipe) at train.py's default size, then ModernBERT's
changes added one at a time, each rung keeping the ones before it, up to ModernBERT as train.py
trains it by default; then ModernBERT with one change taken back out (leave-one-out). Every rung
is a real `python train.py --phase 1` run, on the same data, the same token budget and the same
fixed eval set (train.py's, 15% masked), in its own process and its own runs/ablate/RUNG/.

    python ablate.py                                  # the ladder, 3 seeds at both ends
    python ablate.py --rungs bert,modernbert --tokens 3e5 --seeds 1
    python ablate.py --long_range --run out           # what phases 2 and 3 buy: long-range use
    python ablate.py --rungs bert --lr_grid 1e-4,3e-4,1e-3 --warmup_grid 0.0078,0.1 --seeds 3
    python ablate.py --rungs bert,modernbert --lr_grid 1e-4,1e-3 --lr_grid modernbert=5e-4,2e-3

--lr_grid / --warmup_grid tune each rung first (RUNG=...: that rung over its own values): a
seed-1337 run per grid point, scored on val's tune slice (never on the eval set the table
reports), into runs/ablate/grid/; each rung then runs at its best point on --seeds seeds, and
the table adds the grid, each rung's mean with its 95% interval, and each rung against the one
before it (Welch's t).

Writes runs/ablate/results.md (the table), results.json and val_acc.png (val accuracy against
tokens, one line per rung). A rung that finished is reused and an interrupted one resumed, so
running the command again after a crash loses nothing.

--long_range evaluates a run's phase 1, 2 and 3 checkpoints on long rows (2048, 4096, 8192
tokens): MLM accuracy by the distance to the previous occurrence of the masked token in its
document, and a planted probe (a made-up key -> identifier pair defined once, then masked at a
chosen distance). Writes runs/ablate/long_range.md, .json and .png.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

import train
from modernbert import Config, ModernBERT
from prepare import load_meta, load_split
from runtime import load_checkpoint, mean_interval, one_line_errors, speed_setup

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- the ladder

# Each change: its name, what the table calls it, the row of the README's paper-to-code table it
# tests (None: not in it), and train.py's flags for BERT's way and for ModernBERT's. ModernBERT's
# flags are train.py's defaults, so the top rung is the default phase-1 run (at the ladder's
# budget). Architecture first, then the recipe, each in the order the paper-to-code table lists
# it: the recipe's changes are then measured on the architecture they were tuned for.
CHANGES = [
    ("prenorm", "pre-norm blocks", "Pre-norm blocks, final norm",
     dict(prenorm="off"), dict(prenorm="on")),
    ("no_bias", "no biases", "No biases", dict(bias="on"), dict(bias="off")),
    # BERT's GELU MLP at d_ff 768 has the weights and FLOPs of mini's GeGLU at 512 (2 x 768 =
    # 3 x 512; modernbert.py's bert-mini): the rung measures the gate, not a change of size.
    ("geglu", "GeGLU MLP", "GeGLU MLP", dict(mlp="gelu", d_ff=768), dict(mlp="geglu", d_ff=512)),
    ("rope", "RoPE", "Rotary positions (RoPE)", dict(positions="learned"),
     dict(positions="rope")),
    ("alternating", "alternating local/global attention", "Alternating global/local attention",
     dict(global_every=1), dict(global_every=3)),
    ("mask30", "30% masking", "30% masking, no next-sentence prediction", dict(mask_rate=0.15),
     dict(mask_rate=0.3)),
    # BERT: Adam, beta2 0.999, decay 0.01, the gradient's norm clipped at 1; ModernBERT:
    # StableAdamW, beta2 0.98, decay 1e-5, nothing clipped but each tensor's update. Three rungs:
    # the optimizer alone comes with its decay's units (AdamW decays by lr * 0.01, StableAdamW
    # by lr / peak LR * 1e-5: the same 1e-5 per step at the ladder's peak LR of 1e-3).
    ("stableadamw", "StableAdamW", "StableAdamW", dict(optimizer="adamw", weight_decay=0.01),
     dict(optimizer="stableadamw", beta2=0.999, weight_decay=1e-5)),
    ("beta2", "Adam's beta2 0.98", "StableAdamW", {}, dict(beta2=0.98)),
    ("no_clip", "no gradient-norm clipping", "StableAdamW", dict(grad_clip=1.0),
     dict(grad_clip=0.0)),
    ("wsd", "warmup-stable-decay LR", "Warmup-stable-decay schedule", dict(schedule="linear"),
     dict(schedule="wsd")),
    # ModernBERT's: the batch grows from 4 to 8 sequences over 1/32 of the budget, as in train.py.
    ("batch_warmup", "batch-size warmup", "Batch-size warmup", dict(batch_warmup_tokens=0), {}),
    # Pretraining dropout: BERT 0.1 on embeddings, attention probabilities and both sublayer
    # outputs; ModernBERT 0.1 on the attention output only.
    ("dropout", "ModernBERT's dropout", None, dict(dropout_mode="bert"),
     dict(dropout_mode="modernbert")),
]
README_ANCHOR = "#from-the-paper-to-the-code"
LADDER = ["bert"] + [name for name, *_ in CHANGES[:-1]] + ["modernbert"]
# ModernBERT with something added that train.py's phase 1 does not do, each with the rung it is
# there to be compared with. The wsd rung compares a schedule that stays at its peak (WSD's decay
# is phase 3's) with one that decays to zero: the area under the LR, not the shape. With a
# cooldown of its own, WSD ends its phase 1 decayed too, and the two shapes compare each with its
# decay (at their tuned LRs: --lr_grid RUNG=...).
VARIANTS = {"modernbert+cooldown": ("phase 3's 1 - sqrt decay over phase 1's last 20%",
                                    dict(schedule="wsd-cooldown"), "modernbert-wsd"),
            # Absolute positions, but fixed: against learned ones, "absolute" or "learned from
            # scratch"? (Not a ModernBERT part: modernbert.py's sinusoids, for this rung.)
            "modernbert+sinusoidal": ("fixed sinusoidal positions instead of RoPE",
                                      dict(positions="sinusoidal"), "modernbert-rope")}
# Leave-one-out: the changes whose rungs moved most at the default budget (README).
DEFAULT_LEAVE_ONE_OUT = ["modernbert-rope", "modernbert-wsd", "modernbert-batch_warmup"]
# The two ends, run on --seeds seeds; train.py's default seed first.
ENDS, FIRST_SEED = ["bert", "modernbert"], train.preset_settings("laptop").seed
# 400k tokens: 20 runs (16 rungs, 2 more seeds at each end), two at a time with one thread each;
# 18 of them took about 45 minutes on 2 CPU cores before the optimizer's rung became three
# (README, "What each change buys"). Only large effects stand out of the seed spread at this
# budget; the README also has --tokens 1.6e6.
DEFAULT_TOKENS = 400_000
EVAL_POINTS = 10  # evals per rung without batch warmup (those with it make 1.5x the steps)
# A head start or a gap? Beside each final number, the tokens its curve took to first reach this
# val accuracy: well above the unigram plateau (~4%), reached by ModernBERT at 400k tokens.
THRESHOLD = 0.20


def rung_flags(rung):
    """train.py flags (a dict) of a rung: "bert", a ladder rung named after the change it adds,
    "modernbert", or "modernbert-CHANGE" (ModernBERT with that change back at BERT's)."""
    names = [name for name, *_ in CHANGES]
    if rung in VARIANTS:
        return {**rung_flags("modernbert"), **VARIANTS[rung][1]}
    if rung.startswith("modernbert-") and rung[len("modernbert-"):] in names:
        left_out = rung[len("modernbert-"):]
        flags = {}
        for name, _, _, bert, modern in CHANGES:
            flags.update(bert if name == left_out else modern)
        return flags
    if rung not in LADDER:
        raise ValueError(f"unknown rung {rung!r}")
    added = len(CHANGES) if rung == "modernbert" else LADDER.index(rung)  # changes in place
    flags = {}
    for i, (*_, bert, modern) in enumerate(CHANGES):
        flags.update(modern if i < added else bert)
    return flags


def rung_change(rung):
    """What the rung changes, for the table, linked to the paper-to-code row it tests."""
    if rung == "bert":
        return "BERT: architecture and recipe"
    if rung in VARIANTS:
        return f"ModernBERT with {VARIANTS[rung][0]}"
    for name, label, row, _, _ in CHANGES:
        link = f" ([{row}]({README_ANCHOR}))" if row else ""
        if rung == name or (rung == "modernbert" and name == "dropout"):
            return f"+ {label}{link}" + (" = ModernBERT" if rung == "modernbert" else "")
        if rung == f"modernbert-{name}":
            return f"ModernBERT without {label}{link}"
    return rung


def train_command(rung, seed, args, dtype, point=None, tune=False):
    """The exact train.py command line of one rung: the budget's settings, the rung's flags,
    its grid point (peak LR and LR warmup) if it was tuned, then anything given after `--`. The
    budget's settings are train.py's laptop preset scaled to the budget: the LR warmup and the
    batch warmup keep their shares of the preset's budget. tune: a grid run, scored on val's
    tune slice (never on the eval set the table reports) into OUT/grid/."""
    tokens, laptop = args.tokens, train.preset_settings("laptop")
    share = lambda key: tokens * getattr(laptop, key) // laptop.tokens
    out = grid_dir(args.out, rung, point) if tune else rung_dir(args.out, rung, seed)
    flags = {"data": args.data, "out": out, "model": "mini",
             "seed": seed, "tokens": tokens, "warmup_tokens": share("warmup_tokens"),
             "batch_warmup_tokens": share("batch_warmup_tokens"), "device": "cpu", "dtype": dtype,
             "eval_every": max(1, round(tokens / (laptop.batch_size * laptop.seq_len)
                                        / EVAL_POINTS)), **rung_flags(rung)}
    if point:
        flags.update(lr=point["lr"], warmup_tokens=round(point["warmup"] * tokens))
    if tune:
        flags["eval_set"] = "tune"
    return [sys.executable, os.path.join(HERE, "train.py"), "--phase", "1"] + \
        [part for key, value in flags.items() for part in (f"--{key}", str(value))] + \
        args.train_extra


def rung_dir(out, rung, seed):
    return os.path.join(out, rung if seed == FIRST_SEED else f"{rung}-seed{seed}")


def grid_dir(out, rung, point):
    return os.path.join(out, "grid", f"{rung}-lr{point['lr']:g}-warmup{point['warmup']:g}")


def finished(run_dir):
    """True if the rung's phase 1 finished; False if it never started or stopped midway."""
    ckpt = os.path.join(run_dir, "phase1", "ckpt.pt")
    return os.path.exists(ckpt) and bool(torch.load(ckpt, weights_only=True).get("finished"))


def first_command(run_dir):
    """The train.py flags that started run_dir (train.txt's first line, less --resume and
    --overwrite), or None."""
    console = os.path.join(run_dir, "train.txt")
    if not os.path.exists(console):
        return None
    with open(console) as f:
        words = f.readline().split()
    return words[2:-1] if words[-1:] in (["--resume"], ["--overwrite"]) else words[2:]


def same_flags(a, b):
    """Two train.py command lines (lists of words) asking for the same run: the same flags with
    the same values, in any order."""
    pairs = lambda words: sorted(zip(words[::2], words[1::2])) if len(words) % 2 == 0 else words
    return pairs(a) == pairs(b)


def run_rung(job, args, dtype, progress):
    """One rung (one seed) as a train.py subprocess with --threads threads: resumed if it was
    interrupted, reused if it finished. Its console output goes to RUN_DIR/train.txt. Returns
    None, or what failed (the other rungs keep running)."""
    rung, seed, point, tune = job  # point: its LR and warmup (None: the preset's); tune: a grid run
    run_dir = grid_dir(args.out, rung, point) if tune else rung_dir(args.out, rung, seed)
    name = rung + ("" if seed == FIRST_SEED else f" (seed {seed})") + \
        (f" (grid: LR {point['lr']:g}, warmup {point['warmup']:g})" if tune else "")
    cmd = train_command(rung, seed, args, dtype, point, tune)
    started_by = first_command(run_dir)
    if started_by and not same_flags(started_by, cmd[2:]):  # not another run's numbers here
        progress(f"{name}: {run_dir} holds a run with other flags", done=True)
        return f"{name} ({run_dir} was started as `train.py {' '.join(started_by)}`: give " \
               "another --out, or delete it)"
    if finished(run_dir):
        progress(f"{name}: finished before, reused", done=True)
        return
    ckpt = os.path.join(run_dir, "phase1", "ckpt.pt")
    cmd += ["--resume"] if os.path.exists(ckpt) else ["--overwrite"]
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    progress(f"{name}: started")
    start = time.time()
    try:
        with open(os.path.join(run_dir, "train.txt"), "a") as console:
            console.write(" ".join(cmd) + "\n")
            console.flush()
            code = subprocess.run(cmd, stdout=console, stderr=subprocess.STDOUT, env=env).returncode
    finally:  # wall time adds up over resumed attempts
        timing = os.path.join(run_dir, "wall_s.json")
        spent = json.load(open(timing)) if os.path.exists(timing) else 0.0
        json.dump(spent + time.time() - start, open(timing, "w"))
    if code:
        progress(f"{name}: FAILED (exit {code}), see {run_dir}/train.txt", done=True)
        return f"{name} (exit {code}, {run_dir}/train.txt)"
    result = read_result(run_dir)
    progress(f"{name}: done in {result['wall_s'] / 60:.1f} min, val acc {result['val_acc']:.2%}",
             done=True)


def read_result(run_dir):
    """What the table needs from a finished rung: its log and its checkpoint's shape."""
    log = [json.loads(line) for line in open(os.path.join(run_dir, "phase1", "log.jsonl"))]
    evals = [(r["tokens"], r["val_loss"], r["val_acc"]) for r in log if "val_acc" in r]
    speeds = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
    config = torch.load(os.path.join(run_dir, "phase1", "ckpt.pt"), weights_only=True)["config"]
    params = sum(p.numel() for p in ModernBERT(Config(**config)).parameters())
    return dict(params=params, tokens_per_s=float(np.median(speeds)),
                wall_s=json.load(open(os.path.join(run_dir, "wall_s.json"))),
                tokens=evals[-1][0], val_loss=evals[-1][1], val_acc=evals[-1][2],
                curve=[(t, acc) for t, _, acc in evals])


def run_all(args, jobs, dtype, what):
    """The jobs, --jobs at a time, each a train.py subprocess; a failure stops the ladder only
    once the others are done, and a second call resumes it."""
    print(f"ablate.py: {what}: {len(jobs)} train.py runs of {args.tokens:,} tokens, {args.jobs} "
          f"at a time, {args.threads} thread(s) each, {dtype}; logs in {args.out}/.../train.txt")
    finished_jobs = []

    def progress(message, done=False):
        finished_jobs.extend([message] if done else [])
        print(f"[{time.strftime('%H:%M:%S')}] {message} ({len(finished_jobs)}/{len(jobs)} done)",
              flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on their subprocesses
        failed = [f for f in pool.map(lambda job: run_rung(job, args, dtype, progress), jobs) if f]
    if failed:
        raise ValueError(f"{len(failed)} run(s) failed: {'; '.join(failed)}; run ablate.py "
                         "again to resume")


def grid_points(args, rung):
    """The rung's grid of peak LR x LR warmup: its own values where --lr_grid/--warmup_grid name
    it, else the ones for every rung (a grid over one of the two keeps the preset's value of the
    other); [] where neither flag covers the rung (it runs at the preset's)."""
    laptop = train.preset_settings("laptop")
    lrs, warmups = [grids.get(rung) or grids.get(None) for grids in (args.lr_grid,
                                                                     args.warmup_grid)]
    if not (lrs or warmups):
        return []
    return [{"lr": lr, "warmup": w} for lr in lrs or [laptop.lr]
            for w in warmups or [laptop.warmup_tokens / laptop.tokens]]


def tune_grid(args, dtype):
    """(grid, chosen): each rung with a grid of several points over it (seed 1337, scored on
    val's tune slice), and its chosen point, the best tune accuracy (then the lower tune loss). A
    one-point grid is chosen as given, without grid runs; a rung without a grid is not in chosen."""
    points = {rung: grid_points(args, rung) for rung in args.rungs}
    chosen = {rung: p[0] for rung, p in points.items() if len(p) == 1}
    tuned = [rung for rung in args.rungs if len(points[rung]) > 1]
    if tuned:
        run_all(args, [(rung, FIRST_SEED, p, True) for rung in tuned for p in points[rung]],
                dtype, "the grid, on val's tune slice")
    grid = {}
    for rung in tuned:
        grid[rung] = [dict(p, **{k: v for k, v in read_result(grid_dir(args.out, rung, p)).items()
                                 if k in ("val_acc", "val_loss", "tokens_per_s", "wall_s")},
                           command=" ".join(["python"] + train_command(rung, FIRST_SEED, args,
                                                                       dtype, p, True)[1:]))
                      for p in points[rung]]
        best = max(grid[rung], key=lambda r: (r["val_acc"], -r["val_loss"]))
        chosen[rung] = {"lr": best["lr"], "warmup": best["warmup"]}
    return grid, {rung: chosen[rung] for rung in args.rungs if rung in chosen}


def ladder(args):
    dtype = args.dtype
    if dtype == "auto":  # measured once, so that every rung runs in the same precision
        dtype = "bf16" if speed_setup("cpu", "auto", "off")[0] else "fp32"
    os.makedirs(args.out, exist_ok=True)
    tuned = bool(args.lr_grid or args.warmup_grid)
    grid, chosen = tune_grid(args, dtype) if tuned else ({}, {})
    jobs = [(rung, FIRST_SEED) for rung in args.rungs]
    jobs += [(rung, FIRST_SEED + i) for i in range(1, args.seeds) for rung in args.rungs
             if tuned or rung in ENDS]  # a tuned ladder compares every rung: seeds for all
    run_all(args, [(rung, seed, chosen.get(rung), False) for rung, seed in jobs], dtype,
            "the ladder" + (", each rung at its chosen point" if tuned else ""))
    results = {f"{rung}@{seed}": read_result(rung_dir(args.out, rung, seed)) for rung, seed in jobs}
    table = results_table(args, results, jobs, dtype, grid, chosen)
    print(table)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    commands = {key: " ".join(["python"] + train_command(rung, seed, args, dtype,
                                                         chosen.get(rung))[1:])
                for key, (rung, seed) in zip(results, jobs)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"tokens": args.tokens, "dtype": dtype, "runs": results, "commands": commands,
                   "grid": grid, "chosen": chosen}, f, indent=1)
    plot_curves(args, results, jobs, os.path.join(args.out, "val_acc.png"))
    print(f"wrote {args.out}/results.md, results.json, val_acc.png")


def results_table(args, results, jobs, dtype, grid, chosen):
    """The markdown table: one row per rung (its first seed); the seeds' spread, mean and 95%
    interval where a rung has several; for a tuned ladder, the grid; and between rungs with
    several seeds, each against the one below it (Welch's t on the seeds)."""
    lines = [f"Phase 1 on `{args.data}`, {args.tokens:,} tokens per rung, {dtype}, "
             f"{args.threads} thread(s) per run, {args.jobs} at a time, seed {FIRST_SEED}; val = "
             "train.py's fixed eval set (15% masked).", "",
             "| rung | what changes | parameters | tokens/s | wall time | val loss | val acc | "
             f"tokens to {THRESHOLD:.0%} |" + (" peak LR, LR warmup |" if chosen else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if chosen else "")]
    for rung in args.rungs:
        r = results[f"{rung}@{FIRST_SEED}"]
        point = chosen.get(rung)
        how = " (chosen on tune)" if rung in grid else " (given)"
        lines.append(f"| {rung} | {rung_change(rung)} | {r['params'] / 1e6:.2f}M | "
                     f"{r['tokens_per_s']:,.0f} | {r['wall_s'] / 60:.1f} min | "
                     f"{r['val_loss']:.3f} | {r['val_acc']:.2%} | {to_threshold(r)} |"
                     + (f" {point['lr']:g}, {point['warmup']:g} of the budget{how} |" if point
                        else " the preset's |" if chosen else ""))
    seeds = sorted({seed for _, seed in jobs})
    accs = {rung: [results[f"{rung}@{s}"]["val_acc"] * 100 for s in seeds
                   if f"{rung}@{s}" in results] for rung in args.rungs}
    several = [rung for rung in args.rungs if len(accs[rung]) > 1]
    if several:
        lines += ["", f"Seed-to-seed spread ({len(seeds)} seeds: {', '.join(map(str, seeds))}):",
                  "", "| rung | val acc per seed | mean | 95% interval | max - min | std "
                  f"| val loss per seed | max - min | tokens to {THRESHOLD:.0%} per seed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for rung in several:
            a = np.array(accs[rung])
            losses = [results[f"{rung}@{s}"]["val_loss"] for s in seeds]
            low, high = mean_interval(a)
            lines.append(f"| {rung} | {', '.join(f'{x:.2f}%' for x in a)} | {a.mean():.2f}% | "
                         f"{low:.2f}-{high:.2f}% | {a.max() - a.min():.2f} points | "
                         f"{a.std(ddof=1):.2f} points | {', '.join(f'{x:.3f}' for x in losses)} "
                         f"| {max(losses) - min(losses):.3f} | "
                         f"{', '.join(to_threshold(results[f'{rung}@{s}']) for s in seeds)} |")
    if grid:
        lines += ["", "Each rung's grid (seed 1337, scored on val's tune slice, not on the eval "
                  "set above; * chosen):", "", "| rung | peak LR | LR warmup (share of the budget) "
                  "| tune loss | tune acc |", "|---|---|---|---|---|"]
        for rung, points in grid.items():
            for p in points:
                star = "*" if chosen[rung] == {"lr": p["lr"], "warmup": p["warmup"]} else ""
                lines.append(f"| {rung} | {p['lr']:g} | {p['warmup']:g} | {p['val_loss']:.3f} | "
                             f"{p['val_acc']:.2%}{star} |")
    pairs = compared_pairs(several)
    if pairs:
        lines += ["", "Each rung against the one before it, each leave-one-out rung against "
                  "modernbert, each variant against modernbert and its own counterpart (val acc, "
                  "mean over seeds; Welch's t):", "",
                  "| rungs | difference | p |", "|---|---|---|"]
        for a, b in pairs:
            diff, p = welch(accs[b], accs[a])
            lines.append(f"| {a} -> {b} | {diff:+.2f} points | {p:.3f} |")
    return "\n".join(lines)


def to_threshold(result):
    """The tokens at the first eval at or above THRESHOLD val accuracy, or 'never'."""
    reached = [tokens for tokens, acc in result["curve"] if acc >= THRESHOLD]
    return f"{reached[0] / 1e6:.2f}M" if reached else "never"


def compared_pairs(rungs):
    """(before, after) rung pairs to test: each ladder rung against the ladder rung before it in
    the table, each leave-one-out rung (modernbert-CHANGE) against modernbert, each variant
    against modernbert and against the rung it is there to be compared with."""
    ladder = [r for r in rungs if r in LADDER]
    pairs = list(zip(ladder, ladder[1:]))
    pairs += [("modernbert", r) for r in rungs
              if r.startswith("modernbert-") and "modernbert" in rungs]
    return pairs + [(other, r) for r in rungs if r in VARIANTS
                    for other in ("modernbert", VARIANTS[r][2]) if other in rungs]


def welch(a, b):
    """mean(a) - mean(b), and the two-sided p of Welch's t (unequal variances); p is 1.0 where
    both sets of seeds agree to the last digit (a collapsed rung on every seed)."""
    from scipy import stats
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 and b.std() == 0:
        return a.mean() - b.mean(), 1.0 if a.mean() == b.mean() else 0.0
    return a.mean() - b.mean(), float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def seed_band(curves):
    """Seeds' curves, each (evals, 2) of (tokens, accuracy) -> (tokens, mean, lowest, highest)
    per eval, or None for one seed. Seeds eval at the same steps, but the tokens they count there
    differ by a few (each seed packs other documents into its rows): eval i of every seed is one
    point, at the seeds' mean token count."""
    if len(curves) < 2 or len({len(c) for c in curves}) > 1:
        return None
    stacked = np.stack(curves)                      # (seeds, evals, 2)
    accs = stacked[:, :, 1]
    return stacked[:, :, 0].mean(0), accs.mean(0), accs.min(0), accs.max(0)


def plot_curves(args, results, jobs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    # The ladder dark to light; each leave-one-out rung and variant (dashed) in a colour of its own.
    ladder = [r for r in args.rungs if r in LADDER]
    left_out = [r for r in args.rungs if r not in LADDER]
    colors = dict(zip(ladder, plt.cm.viridis(np.linspace(0, 0.9, len(ladder)))))
    contrast = ["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    colors.update({r: contrast[i % len(contrast)] for i, r in enumerate(left_out)})
    for rung, color in colors.items():
        curves = [np.array(results[f"{rung}@{seed}"]["curve"]) * [1e-6, 100]
                  for seed in sorted({s for r, s in jobs if r == rung})]  # (evals, 2) each
        style = dict(color=color, ls="-" if rung in LADDER else "--")
        band = seed_band(curves)
        if band is not None:
            tokens, mean, low, high = band
            ax.fill_between(tokens, low, high, color=color, alpha=0.2)
            ax.plot(tokens, mean, lw=1.8, label=f"{rung} ({len(curves)} seeds)", **style)
        else:
            ax.plot(curves[0][:, 0], curves[0][:, 1], lw=1.8, label=rung, **style)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("val MLM accuracy, 15% masked (%)")
    ax.set_title(f"The ladder, BERT -> ModernBERT, phase 1 ({args.tokens:,} tokens per rung)\n"
                 "several seeds: their mean, the band from lowest to highest", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- long range
# Plain MLM accuracy by position is flat (most masked code tokens are predictable from the
# +-64-token window); long-range use shows in the tokens that need something far away. Two
# measures, on rows of phase 2's length (2048) and longer:
# 1. real val documents: accuracy by the distance to the previous occurrence of the masked token
#    in its row, the same 15% masks as train.py's eval set;
# 2. repeats pulled apart: an identifier used twice close together in val code, its two
#    contexts moved d tokens apart with real code between them, the second use masked: beyond
#    what the control (the first use's context swapped for other code) gets, only a model that
#    looks d tokens back can fill it in.

BUCKETS = ["<= 64", "65-256", "257-1024", "> 1024", "first"]
ROW_LENGTHS = [2048, 4096, 8192]
PROBE_DISTANCES = [32, 128, 512, 1024, 2048, 4096]
PAIRS_PER_ROW = 8   # repeats pulled apart in one row (fewer where d is short)


def previous_distances(ids):
    """For each position: how many tokens back the same id occurred last (0: never before)."""
    last, out = {}, np.zeros(len(ids), dtype=np.int64)
    for i, token in enumerate(np.asarray(ids).tolist()):
        out[i] = i - last[token] if token in last else 0
        last[token] = i
    return out


def bucket_of(distances):
    """Index into BUCKETS: <= 64, 65-256, 257-1024, > 1024, and 4 for a first occurrence (0)."""
    distances = np.asarray(distances)
    return np.where(distances == 0, 4, np.searchsorted([64, 256, 1024], distances))


def load_phase(run, phase, max_len):
    """A phase's trained model, in eval mode, able to read rows of max_len tokens."""
    path = os.path.join(run, f"phase{phase}", "ckpt.pt")
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: --long_range reads a run's three phases "
                         f"(python train.py --phase {phase} --out {run})")
    ckpt = load_checkpoint(path)
    try:
        config = Config(**ckpt["config"])
    except TypeError as e:  # a checkpoint of another modernbert.py
        raise ValueError(f"{path} does not fit this modernbert.py ({e}): train it again") from None
    if config.positions != "rope":
        raise ValueError(f"{path} has {config.positions} positions, not RoPE's; --long_range "
                         "needs a RoPE model")
    model = ModernBERT(replace(config, max_seq_len=max_len))  # RoPE: any length, no table
    model.load_state_dict(ckpt["model"])
    return model.eval()


@torch.no_grad()
def predict(model, rows, autocast, max_tokens):
    """rows: (inputs, labels) pairs of 1-D arrays, each one document piece. Packs them into
    forward passes of at most max_tokens and returns, per row, whether each labelled position
    (in order) was predicted right."""
    correct, batch = [], []

    def flush():
        if batch:
            ids, cu_seqlens, labels = train.to_device([i for i, _ in batch], [l for _, l in batch],
                                                      [[(0, len(i))] for i, _ in batch], "cpu")
            with autocast():
                logits, _ = model(ids, cu_seqlens=cu_seqlens, labels=labels)
            hits = (logits.argmax(-1) == labels[labels != -100]).numpy()
            counts = [int((l != -100).sum()) for _, l in batch]
            correct.extend(np.split(hits, np.cumsum(counts)[:-1]))
            batch.clear()

    for row in rows:
        if batch and sum(len(i) for i, _ in batch) + len(row[0]) > max_tokens:
            flush()
        batch.append(row)
    flush()
    return correct


def long_documents(data, max_len, probe_tokens):
    """Val documents of at least 2048 tokens, in file order, each cut to its first max_len
    tokens, until probe_tokens: [(start, end)] in the val stream."""
    _, offsets = load_split(data, "val")
    docs, n = [], 0
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        if end - start >= min(ROW_LENGTHS) and n < probe_tokens:
            docs.append((start, min(end, start + max_len)))
            n += docs[-1][1] - start
    return docs


def distance_accuracy(model, data, meta, docs, row_len, autocast):
    """Per bucket (correct, count) over the documents cut into rows of row_len tokens, masked as
    train.py's eval set masks the val stream; distances are counted inside each row, where the
    model can see them."""
    tokens, _ = load_split(data, "val")
    special, ordinary = train.special_and_ordinary_ids(meta)
    inputs, labels = train.mask_tokens(tokens.astype(np.int64),
                                       np.random.default_rng(train.EVAL_SEED), 0.15,
                                       meta["mask_id"], special, ordinary)
    pieces = [p for start, end in docs for p in train.document_pieces([start, end], row_len)]
    rows = [(inputs[s:s + n], labels[s:s + n]) for s, n in pieces]
    hits = predict(model, rows, autocast, max(row_len, 8192))
    sums = np.zeros((len(BUCKETS), 2), dtype=np.int64)
    for (s, n), hit in zip(pieces, hits):
        buckets = bucket_of(previous_distances(tokens[s:s + n]))[labels[s:s + n] != -100]
        np.add.at(sums, (buckets, 0), hit.astype(np.int64))
        np.add.at(sums, (buckets, 1), 1)
    return sums


def identifier_ids(data, meta):
    """Ids that read as identifiers (a letter or _, then 2+ word characters; a leading space
    allowed), or every ordinary id for data without a tokenizer.json (synthetic test data)."""
    _, ordinary = train.special_and_ordinary_ids(meta)
    path = os.path.join(data, "tokenizer.json")
    if not os.path.exists(path):
        return ordinary
    vocab = json.load(open(path))["model"]["vocab"]
    return np.array(sorted(i for text, i in vocab.items()
                           if re.fullmatch(r"\u0120?[A-Za-z_]\w{2,}", text)))


def repeats(tokens, docs, ids):
    """(a, b) pairs: an identifier at a used again at b, 32 to 64 tokens later, with no other
    occurrence from a - 64 to b + 64, inside one document, 32 tokens from either end."""
    ids, pairs = set(ids.tolist()), []
    for start, end in docs:
        last = {}
        for i in range(start, end):
            t = int(tokens[i])
            if t in ids:
                a = last.get(t)
                if a is not None and 32 <= i - a <= 64 and a - 32 >= start and i + 32 <= end:
                    window = tokens[max(start, a - 64):min(end, i + 65)]
                    if (window == t).sum() == 2:
                        pairs.append((a, i))
                last[t] = i
    return pairs


def planted_rows(data, meta, n_pairs, distances, seed=0, define=True):
    """Real repeats, pulled apart. An identifier X used twice 32-64 tokens apart in val code:
    the definition's context (32 tokens before X, 15 after), real code from elsewhere as filler,
    then the use's context (16 before X, 31 after) with X masked, so that X sits d tokens back.
    Up to PAIRS_PER_ROW pairs share a row: definitions first, then the filler, then the uses in
    the same order, so that every use is d after its definition. define=False: the control, each
    definition's context swapped for code from elsewhere; X can then only come from nearby code.
    Any other X in the row (in the filler, say) becomes another identifier, so that every d
    probes the same repeats. Returns (inputs, labels) rows and the distance of each label."""
    tokens, offsets = load_split(data, "val")
    docs = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    rng = np.random.default_rng([seed, define])
    identifiers = identifier_ids(data, meta)
    pairs = repeats(tokens, docs, identifiers)
    if not pairs:
        raise ValueError(f"no identifier used twice 32-64 tokens apart in {data}'s val split")
    pairs = [pairs[i] for i in rng.permutation(len(pairs))[:n_pairs]]

    def code(n):  # n tokens of real val code from a random place inside one document
        start, end = docs[rng.choice([i for i, (s, e) in enumerate(docs) if e - s >= n])]
        at = int(rng.integers(start, end - n + 1))
        return tokens[at:at + n].astype(np.int64)

    rows, row_distances = [], []
    for d in distances:
        k = max(1, min(PAIRS_PER_ROW, (d + 16) // 48))  # pairs per row that fit d
        for first in range(0, len(pairs), k):
            group = pairs[first:first + k]
            defs = [tokens[a - 32:a + 16].astype(np.int64) if define else code(48)
                    for a, _ in group]
            uses = [tokens[b - 16:b + 32].astype(np.int64) for _, b in group]
            filler = code(d + 16 - 48 * len(group))
            ids = np.concatenate(defs + [filler] + uses)
            labels = np.full(len(ids), -100)
            xs = [int(tokens[b]) for _, b in group]
            others = np.setdiff1d(identifiers, xs)
            for j, x in enumerate(xs):
                use = 48 * len(group) + len(filler) + 48 * j + 16
                labels[use], ids[use] = x, meta["mask_id"]
                elsewhere = np.flatnonzero(ids == x)
                elsewhere = elsewhere[elsewhere != 48 * j + 32] if define else elsewhere
                ids[elsewhere] = rng.choice(others, len(elsewhere))  # X: only at its definition
            rows.append((ids, labels))
            row_distances.append(np.full(len(group), d))
    return rows, row_distances


def planted_accuracy(model, rows, row_distances, autocast):
    """({d: (correct, count)}, {d: [hit or not, per planted use]}) over the planted uses; the
    uses are the same, in the same order, for every model, so two models' hits pair up."""
    hits = np.concatenate(predict(model, rows, autocast, 8192))
    distances = np.concatenate(row_distances)
    ds = sorted(set(distances.tolist()))
    return ({d: (int(hits[distances == d].sum()), int((distances == d).sum())) for d in ds},
            {d: hits[distances == d].astype(int).tolist() for d in ds})


def mcnemar(before, after):
    """(uses only `after` gets right, uses only `before` gets right, the exact two-sided McNemar
    p): the paired test of two models on the same uses."""
    from scipy import stats
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    gained, lost = int((after & ~before).sum()), int((before & ~after).sum())
    p = stats.binomtest(min(gained, lost), gained + lost, 0.5).pvalue if gained + lost else 1.0
    return gained, lost, float(p)


def long_range(args):
    meta = load_meta(args.data)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and
                                    speed_setup("cpu", "auto", "off")[0])
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else \
        nullcontext
    docs = long_documents(args.data, max(ROW_LENGTHS), args.probe_tokens)
    planted = planted_rows(args.data, meta, args.probe_pairs, PROBE_DISTANCES)
    control = planted_rows(args.data, meta, args.probe_pairs, PROBE_DISTANCES, define=False)
    print(f"ablate.py --long_range: {args.run}/phase{{1,2,3}}, {len(docs)} val documents of "
          f"2048+ tokens ({sum(e - s for s, e in docs):,} tokens, each cut to its first "
          f"{max(ROW_LENGTHS)}), {'bf16' if bf16 else 'fp32'}")
    results = {"buckets": {}, "planted": {}, "control": {}, "planted_hits": {}}
    for phase in (1, 2, 3):
        model = load_phase(args.run, phase, max(ROW_LENGTHS))
        t0 = time.time()
        for row_len in ROW_LENGTHS:
            sums = distance_accuracy(model, args.data, meta, docs, row_len, autocast)
            results["buckets"][f"{phase}@{row_len}"] = sums.tolist()
        results["planted"][phase], results["planted_hits"][phase] = \
            planted_accuracy(model, *planted, autocast)
        results["control"][phase] = planted_accuracy(model, *control, autocast)[0]
        print(f"phase {phase}: evaluated in {time.time() - t0:.0f} s "
              f"(theta global {model.config.global_theta:g})", flush=True)
    report = long_range_report(args, results)
    print(report)
    with open(os.path.join(args.out, "long_range.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, "long_range.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot_long_range(results, os.path.join(args.out, "long_range.png"))
    print(f"wrote {args.out}/long_range.md, long_range.json, long_range.png")


def accuracy_cell(correct, count):
    """'51.2% +- 1.3 (n=1,480)': the share right and its binomial standard error."""
    if not count:
        return "n=0"
    p = correct / count
    return f"{p:.1%} +- {100 * np.sqrt(p * (1 - p) / count):.1f} (n={count:,})"


def long_range_report(args, results):
    lines = [f"Long-range use: `{args.run}`, phases 1-3 on val documents of 2048+ tokens, 15% "
             "masked as train.py's eval set. Accuracy by the distance to the previous "
             "occurrence of the masked token in its row (+- one binomial standard error):", "",
             "| phase | row length | " + " | ".join(BUCKETS) + " |",
             "|---|---|" + "---|" * len(BUCKETS)]
    for key, sums in results["buckets"].items():
        phase, row_len = key.split("@")
        lines.append(f"| {phase} | {int(row_len):,} | " +
                     " | ".join(accuracy_cell(c, n) for c, n in sums) + " |")
    lines += ["", "Repeats pulled apart: an identifier used twice 32-64 tokens apart in val code, "
              "the two contexts moved d tokens apart with other real code between them, the "
              f"second use masked (up to {args.probe_pairs} repeats per d); the control swaps the "
              "first use's context for other code, leaving only what nearby code tells:", "",
              "| phase | " + " | ".join(f"d = {d:,}" for d in PROBE_DISTANCES) + " | control |",
              "|---|" + "---|" * (len(PROBE_DISTANCES) + 1)]
    for phase, by_distance in results["planted"].items():
        control = np.array(list(results["control"][phase].values())).sum(0)
        lines.append(f"| {phase} | " + " | ".join(accuracy_cell(*by_distance[d])
                                                  for d in PROBE_DISTANCES) +
                     f" | {accuracy_cell(*control)} |")
    lines += ["", "Phase against phase on the same repeats (exact McNemar test: repeats only the "
              "later phase gets right / only the earlier one, two-sided p):", "",
              "| phases | " + " | ".join(f"d = {d:,}" for d in PROBE_DISTANCES) + " |",
              "|---|" + "---|" * len(PROBE_DISTANCES)]
    hits = results["planted_hits"]
    for a, b in [(1, 2), (2, 3), (1, 3)]:
        cells = [mcnemar(hits[a][d], hits[b][d]) for d in PROBE_DISTANCES]
        lines.append(f"| {a} -> {b} | " + " | ".join(f"+{g} / -{l}, p = {p:.2f}"
                                                   for g, l, p in cells) + " |")
    return "\n".join(lines)


def plot_long_range(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {2048: "-", 4096: "--", 8192: ":"}
    for key, sums in results["buckets"].items():
        phase, row_len = map(int, key.split("@"))
        sums = np.array(sums)
        left.plot(BUCKETS, 100 * sums[:, 0] / np.maximum(sums[:, 1], 1), ls=styles[row_len],
                  marker="o", color=f"C{phase - 1}", label=f"phase {phase}, rows of {row_len}")
    left.set_xlabel("distance to the previous occurrence of the masked token")
    left.set_ylabel("MLM accuracy (%)")
    left.legend(fontsize=7)
    for phase, by_distance in results["planted"].items():
        d = np.array(PROBE_DISTANCES)
        c, n = np.array([by_distance[x] for x in PROBE_DISTANCES]).T
        p = c / np.maximum(n, 1)
        right.errorbar(d, 100 * p, yerr=100 * np.sqrt(p * (1 - p) / np.maximum(n, 1)),
                       marker="o", capsize=3, color=f"C{int(phase) - 1}", label=f"phase {phase}")
    right.set_xscale("log", base=2)
    right.set_xlabel("distance d from the planted definition (tokens)")
    right.set_ylabel("planted identifier filled in (%)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the command line

def get_args(argv):
    """ablate.py's own flags; anything after `--` goes to every train.py run as it is."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="ablate.py", description="The BERT -> ModernBERT ladder, "
                                "measured; --long_range: what the phases buy for long context.",
                                epilog="Flags after -- go to every train.py run, after the "
                                "rung's own (e.g. -- --eval_tokens 32768).")
    count = lambda s: int(float(s))  # accepts 1e6

    def grid(s):  # "1e-4,3e-4" -> (None, [0.0001, 0.0003]); "bert=1e-4" -> ("bert", [0.0001])
        rung, _, values = s.rpartition("=")
        return rung.strip() or None, [float(x) for x in values.split(",") if x.strip()]
    p.add_argument("--rungs", default=",".join(LADDER + DEFAULT_LEAVE_ONE_OUT),
                   help="comma-separated, in table order: bert, the ladder's changes, "
                        "modernbert, modernbert-CHANGE (leave-one-out), "
                        f"{', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--tokens", type=count, default=DEFAULT_TOKENS,
                   help="token budget of every rung (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds for the two ends, bert and modernbert (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2,
                   help="rungs run at once (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads per rung (default: %(default)s)")
    p.add_argument("--data", default="data/stdlib", help="(default: %(default)s)")
    p.add_argument("--out", default="runs/ablate", help="(default: %(default)s)")
    p.add_argument("--lr_grid", type=grid, action="append", default=[], metavar="[RUNG=]LRS",
                   help="peak LRs to tune every rung over (comma-separated), each rung then run "
                        "at its best on --seeds seeds; RUNG=LRS: that rung's own grid (give the "
                        "flag again for each) (default: the preset's, untuned)")
    p.add_argument("--warmup_grid", type=grid, action="append", default=[],
                   metavar="[RUNG=]SHARES", help="LR warmups to tune over, as shares of the "
                   "budget; RUNG=SHARES as for --lr_grid (default: the preset's)")
    # fp32 by default: one precision for every rung, whatever a start-up measurement says. On
    # this project's VM (AVX2, no bf16 units) a mini training step at one thread ran ~15x
    # slower under bf16 autocast than in fp32, measured side by side in one process.
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="fp32",
                   help="precision of every rung; auto: train.py's choice, measured once "
                        "(default: %(default)s)")
    g = p.add_argument_group("long range")
    g.add_argument("--long_range", action="store_true",
                   help="evaluate --run's phase 1, 2, 3 checkpoints instead of the ladder")
    g.add_argument("--run", default="out", help="train.py's --out of that run (default: out)")
    g.add_argument("--probe_tokens", type=count, default=98_304,
                   help="val tokens in long documents to bucket (default: %(default)s)")
    g.add_argument("--probe_pairs", type=int, default=192,
                   help="repeated identifiers in the pulled-apart probe (default: %(default)s)")
    args = p.parse_args(argv)
    args.rungs = [r.strip() for r in args.rungs.split(",") if r.strip()]
    for rung in args.rungs:
        try:
            rung_flags(rung)
        except ValueError:
            p.error(f"unknown rung {rung!r}; choose from {', '.join(LADDER + list(VARIANTS))}, "
                    f"or modernbert-CHANGE for a change in {', '.join(n for n, *_ in CHANGES)}")
    for key in ("tokens", "seeds", "jobs", "threads", "probe_tokens", "probe_pairs"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be at least 1, got {getattr(args, key)}")
    for key, ok, want in [("lr_grid", lambda v: v > 0 and np.isfinite(v), "positive LRs"),
                          ("warmup_grid", lambda v: 0 <= v < 1, "shares of the budget in [0, 1)")]:
        grids = dict(getattr(args, key))  # rung (None: every other rung) -> its values
        for rung, values in grids.items():
            name = f"--{key} {rung}=" if rung else f"--{key}"
            if rung and rung not in args.rungs:
                p.error(f"{name}: {rung!r} is not in --rungs")
            if not values or not all(map(ok, values)):
                p.error(f"{name} must hold {want}, got {values}")
        setattr(args, key, grids)
    try:
        load_meta(args.data)  # "run prepare.py first"
    except ValueError as e:
        p.error(str(e))
    args.train_extra = extra
    return args


def main(argv=None):
    args = get_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with one_line_errors("ablate.py"):
        if args.long_range:
            long_range(args)
        else:
            ladder(args)


if __name__ == "__main__":
    main()
