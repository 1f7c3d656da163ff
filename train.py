"""
Pretrain ModernBERT with the paper's three-phase recipe, from a laptop CPU to many GPUs.

    python prepare.py                  # once: tokenize the corpus into data/stdlib
    python train.py --phase 1          # pretraining at the base length, theta 10k everywhere
    python train.py --phase 2          # context extension: 8x the length, global theta 160k
    python train.py --phase 3          # decay: the LR falls as 1 - sqrt to 0.001 x its peak
    torchrun --nproc_per_node=8 train.py --phase 1 --preset base-24gb     # DDP, a process per GPU

Phase N writes out/phaseN/: ckpt.pt (continue an interrupted phase with --resume), log.jsonl,
tokenizer.json and hf/ (a Hugging Face directory). Phase N+1 starts from out/phaseN/ckpt.pt and
derives its defaults (length, learning rate, token budget, batch) from phase N's settings, the
way the paper derived its phases from each other; any flag given explicitly wins.

It reads in the order a run executes: the settings, main() and its flags, train(), whose loop
is one training step after another; then each piece it calls, in the order it calls them.
"""
import argparse
import bisect
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from modernbert import MLPS, POSITIONS, PRESETS, Config, ModernBERT, config_for, cu_seqlens_of
from prepare import load_meta, load_split
from runtime import (autocast_for, device_flag, export_hf, load_checkpoint, one_line_errors,
                     pick_device, save_atomic, speed_setup)

# ----------------------------------------------------------------------------- the recipe

PRESET_NAMES = ["laptop", "base-24gb", "large-24gb"]
# laptop: a CPU, 2 cores, phase 1 in minutes (how its numbers were chosen: see the README).
# base-24gb, large-24gb: the paper's shapes on one 24 GB GPU (bf16, flash-attn), the paper's
# lengths, LRs and warmups at a smaller batch; phase 2 then runs 8192-token rows one at a time.
PRESET_MODELS = {"laptop": "mini", "base-24gb": "base", "large-24gb": "large"}


count = lambda text: int(float(text))  # a token count as a flag: accepts 3e6


@dataclass(frozen=True)
class Setting:
    """One run setting, declared once: its phase-1 value in each preset (one value: the same in
    all), its flag's type or choices (None: no flag), the rule a value must keep as (test, what
    it must be), and the flag's help. Phases 2 and 3 derive theirs (see derived_settings)."""
    name: str
    values: object
    kind: object
    rule: tuple
    help: str

    def value(self, preset):
        one = type(self.values) is not tuple
        return self.values if one else self.values[PRESET_NAMES.index(preset)]


def at_least(low, why=""):
    return (lambda v: v >= low, f"at least {low}{why}")


POSITIVE = (lambda v: v > 0, "positive")
ROW = " (a row holds [CLS] ... [SEP] and tokens to mask)"
SETTINGS = [  # phase-1 values: (laptop, base-24gb, large-24gb), or one value for all three
    Setting("seq_len", (256, 1024, 1024), int, at_least(16, ROW),
            "row length in tokens (phase 2: 8x phase 1's)"),
    Setting("tokens", (6_400_000, 2 * 10**9, 2 * 10**9), count, at_least(1),
            "token budget of the phase (phases 2, 3: the paper's proportions)"),
    Setting("lr", (1e-3, 8e-4, 5e-4), float, POSITIVE,
            "peak learning rate (phases 2, 3: phase 1's x later_lr_factor)"),
    Setting("warmup_tokens", (50_000, 30 * 10**6, 20 * 10**6), count, at_least(0),
            "phase 1: linear LR warmup, in tokens"),
    Setting("batch_size", (8, 512, 512), int, at_least(1), "global batch in sequences "
            "(phase 2: phase 1's / 8)"),
    Setting("min_batch_size", (4, 64, 64), int, at_least(1), "phase 1: batch warmup's start"),
    Setting("batch_warmup_tokens", (200_000, 10**8, 10**8), count, at_least(0),
            "phase 1: tokens over which the batch grows"),
    Setting("micro_batch", (4, 8, 4), int, at_least(1), "sequences per forward pass and process"),
    Setting("weight_decay", 1e-5, float, at_least(0), "decoupled weight decay"),
    Setting("dropout", 0.1, float, (lambda v: 0 <= v < 1, "in [0, 1)"), "attention-output dropout"),
    Setting("mask_rate", 0.3, float, (lambda v: 0 < v < 1, "in (0, 1)"), "share masked"),
    Setting("seed", 1337, int, None, "seed of init, data order, masks and dropout"),
    # BERT's recipe, switch by switch (ModernBERT's first): the optimizer, gradient-norm clipping
    # (0: none; StableAdamW clips each update instead), the LR shape, and where dropout goes.
    Setting("optimizer", "stableadamw", ["stableadamw", "adamw"], None, "stableadamw (ModernBERT) "
            "or adamw (BERT: eps 1e-6; with --grad_clip 1 --weight_decay 0.01)"),
    # None: the optimizer's own, OWN_BETA2 (what --optimizer alone has always meant).
    Setting("beta2", None, float, (lambda v: 0 < v < 1, "in (0, 1)"),
            "Adam's second-moment decay (default: StableAdamW 0.98, AdamW BERT's 0.999)"),
    Setting("grad_clip", 0.0, float, at_least(0),
            "clip the gradient's global norm to this before each step; 0: off (BERT: 1.0)"),
    Setting("schedule", "wsd", ["wsd", "linear", "wsd-cooldown"], None, "wsd (ModernBERT: "
            "warmup, constant, phase 3's decay), linear (BERT: warmup, then to 0 in each phase) "
            "or wsd-cooldown (wsd, with phase 3's decay also over phase 1's last 20%%: a "
            "phase-1-only run that ends decayed, to compare with linear)"),
    Setting("dropout_mode", "modernbert", ["modernbert", "bert"], None, "modernbert (--dropout "
            "on the attention output) or bert (also embeddings, attention probs, MLP output)"),
    # Phases 2, 3 train at phase 1's LR and weight decay times these (preset only, no flag): base
    # 8e-4 -> 3e-4, the same decay; large's 5e-4 proved too high, so it went on at 5e-5, 1e-6.
    Setting("later_lr_factor", (3 / 8, 3 / 8, 1 / 10), None, None, ""),
    Setting("later_weight_decay_factor", (1.0, 1.0, 1 / 10), None, None, ""),
]


class RunSettings(SimpleNamespace):
    """One phase's settings as attributes (run.lr); checkpoints keep them as a dict, vars(run)."""


def preset_settings(preset):
    return RunSettings(**{s.name: s.value(preset) for s in SETTINGS})


MODEL_KEYS = ["n_layers", "d_model", "n_heads", "d_ff", "window", "global_every"]
# BERT's parts (modernbert.py's Config switches), as flags: a rung of ablate.py is only flags.
MODEL_SWITCHES = ["positions", "mlp", "bias", "prenorm"]

# The paper's token budgets in billions (1.719T, 250B, 50B). Phases 2 and 3 keep these
# proportions to the phase before them unless --tokens says otherwise.
PAPER_TOKENS = {1: 1719, 2: 250, 3: 50}
LENGTH_FACTOR = 8                 # context extension: 1024 -> 8192
DECAY_FLOOR = 0.001               # phase 3 ends at 0.001 x its peak LR
# wsd-cooldown's share of phase 1 spent decaying: 20%, with 1 - sqrt, matched a cosine schedule
# of the same length (Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
# Fixed Training Durations").
COOLDOWN_SHARE = 0.2
EVAL_SEED = 1234                  # fixed, so evals compare across steps, runs, phases and --seed
TRAIN_CKPT_KEYS = {"config", "model", "meta", "phase", "run", "optimizer", "step", "tokens",
                   "position"}


def main(argv=None):
    args = get_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        with one_line_errors("train.py"):
            return train(args, device, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- the command line

def get_args(argv):
    p = argparse.ArgumentParser(prog="train.py", description="ModernBERT's three-phase MLM "
                                "pretraining. Run --phase 1, 2, 3 in turn.")
    add = p.add_argument
    add("--phase", type=int, choices=[1, 2, 3], default=1, help="1: pretrain at the base length; "
        "2: context extension (8x length, global theta 160k); 3: LR decay (default: %(default)s)")
    add("--data", default="data/stdlib", help="prepare.py's output (default: %(default)s)")
    add("--out", default="out", help="phase N writes OUT/phaseN (default: %(default)s)")
    add("--preset", choices=PRESET_NAMES, default="laptop", help="phase-1 recipe: laptop (CPU, "
        "minutes), base-24gb / large-24gb (the paper's shapes on one 24 GB GPU) (default: laptop)")
    add("--resume", action="store_true", help="continue this phase from its ckpt.pt, exactly")
    add("--overwrite", action="store_true", help="start this phase over even if its ckpt.pt exists")
    add("--init_from", metavar="CKPT", help="phase 1: tile up a smaller model's ckpt.pt")
    add = p.add_argument_group("model (phase 1 only; later phases continue phase 1's)").add_argument
    add("--model", choices=PRESETS, help="modernbert.py's model preset (default: --preset's)")
    for key in MODEL_KEYS:
        add(f"--{key}", type=int, help=f"override the preset's {key}")
    add("--positions", choices=POSITIONS,
        help="rope, learned (BERT's table), or sinusoidal (fixed absolute, for the ablation)")
    add("--mlp", choices=MLPS, help="geglu (ModernBERT) or gelu (BERT)")
    add("--bias", type=on_off, metavar="{on,off}", help="biases in linear layers and norms (BERT)")
    add("--prenorm", type=on_off, metavar="{on,off}", help="pre-norm (on) or post-norm (BERT: off)")
    add = p.add_argument_group("run settings (default: --preset's in phase 1, derived from the "
                               "previous phase in 2 and 3)").add_argument
    for s in SETTINGS:
        if s.kind:
            choices = s.kind if isinstance(s.kind, list) else None
            laptop = "" if s.value("laptop") is None else f" (laptop: {s.value('laptop')})"
            add(f"--{s.name}", type=None if choices else s.kind, choices=choices,
                help=s.help + laptop)
    add = p.add_argument_group("running").add_argument
    add("--eval_every", type=int, default=200, help="steps between evals (default: %(default)s)")
    add("--eval_tokens", type=count, default=65536, help="the fixed eval set (default: 65536)")
    add("--eval_set", choices=["val", "tune"], default="val", help="val: the fixed eval set, "
        "the README's numbers; tune: as many other val tokens, to choose settings on")
    add("--ckpt_every", type=int, default=200, help="steps between checkpoints (default: 200)")
    add("--max_steps", type=int, help="stop after this step, resumable, even if tokens remain")
    add("--device", type=device_flag, default="auto", help="auto (cuda, mps, cpu) or a device")
    add("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="bf16 autocast; auto: "
        "on CUDA with bf16, on a CPU where bf16 matmuls measure faster")
    add("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the MLPs; "
        "auto: on for CUDA, not on Windows (default: %(default)s)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def on_off(text):
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def check_args(p, args):
    """Every flag in its range before anything is read or written: argparse's one-line error and
    exit status 2. (Settings from a checkpoint are checked merged, in phase_settings.)"""
    running = dict(eval_every=at_least(1), eval_tokens=at_least(1), ckpt_every=at_least(1),
                   max_steps=at_least(0), **{key: at_least(1) for key in MODEL_KEYS})
    rules = {**{s.name: s.rule for s in SETTINGS if s.rule}, **running}
    for key, (ok, what) in rules.items():
        value = getattr(args, key)
        if value is not None and not ok(value):
            p.error(f"--{key} must be {what}, got {value}")
    for small in ["micro_batch", "min_batch_size"]:
        if args.batch_size and getattr(args, small) and getattr(args, small) > args.batch_size:
            p.error(f"--{small} {getattr(args, small)} is larger than --batch_size "
                    f"{args.batch_size}")
    shape = {k: v for k in MODEL_KEYS + MODEL_SWITCHES if (v := getattr(args, k)) is not None}
    try:  # a model shape that cannot exist (heads that do not divide d_model, an odd window, ...)
        config_for(args.model or PRESET_MODELS[args.preset], **shape)
    except ValueError as e:
        p.error(str(e))


# ----------------------------------------------------------------------------- one phase

@dataclass
class Phase:
    """One phase, set up: what the training loop reads, besides the step counters it keeps."""
    number: int
    run: RunSettings
    model: ModernBERT
    train_model: torch.nn.Module  # the model, or DDP's wrapper of it
    optimizer: torch.optim.Optimizer
    data: "TrainData"
    evals: list                   # the fixed eval set: this rank's (ids, cu_seqlens, labels)
    autocast: object              # a function returning a fresh autocast context (or none)
    flops: float                  # matmul FLOPs per token, and the device's peak FLOP/s (None:
    peak: float                   # unknown), for MFU
    rank: int
    world: int
    dir: str                      # OUT/phaseN, with ckpt_path = OUT/phaseN/ckpt.pt
    ckpt_path: str
    log: object                   # log.jsonl, open on rank 0; None elsewhere
    ckpt_info: dict               # what every checkpoint of this phase holds besides weights


def train(args, device, rank, world):
    """One phase: set up (where it starts, its settings, model, data), the loop, the end."""
    meta = load_meta(args.data)
    start = phase_start(args, meta)  # its own checkpoint (--resume), the previous phase's, or none
    ph = setup_phase(args, meta, start, device, rank, world)
    run, master = ph.run, rank == 0

    # ---- the loop: batch -> forward/backward -> optimizer step -> log -> eval -> checkpoint
    step, tokens, position = start.step, start.tokens, start.position
    step_size = run.micro_batch * world  # the batch grows one micro-batch per process at a time
    ph.model.train()
    bar = tqdm(total=run.tokens, initial=min(tokens, run.tokens), unit="tok", unit_scale=True,
               desc=f"phase {ph.number}", disable=not master, dynamic_ncols=True)
    # A model that did not start from scratch is evaluated first: phases 2 and 3 show what the
    # longer rows and the new theta do before any training; --init_from shows the tiled model.
    last_eval = None  # (step, (val loss, val acc))
    if start.continues_a_model and not start.resumed:
        last_eval = evaluate(ph, step, tokens)
    try:
        while tokens < run.tokens and (args.max_steps is None or step < args.max_steps):
            t0 = time.perf_counter()
            batch_size = batch_size_at(tokens, run.min_batch_size, run.batch_size, step_size,
                                       run.batch_warmup_tokens)
            keys, position = ph.data.next_rows(position, batch_size)
            step_tokens = sum(n for _, i in keys for _, n in ph.data.rows[i])
            lr = lr_at(ph.number, tokens + step_tokens, run.lr, run.warmup_tokens, run.tokens,
                       run.schedule)
            mine = keys[rank::world]  # this process's share of the global batch
            micro_batches = [ph.data.batch(mine[i:i + run.micro_batch], device)
                             for i in range(0, len(mine), run.micro_batch)]
            torch.manual_seed(dropout_seed(run.seed, ph.number, step, rank))
            loss_sum, n_masked = forward_backward(ph.train_model, micro_batches, world,
                                                  ph.autocast)
            train_loss = (loss_sum / n_masked).item()
            if not math.isfinite(train_loss):
                last_good = ph.ckpt_path if os.path.exists(ph.ckpt_path) else "none yet"
                raise ValueError(f"loss is {train_loss} at step {step + 1}; stopped before the "
                                 f"update, the last good checkpoint ({last_good}) is intact. "
                                 "Try a lower --lr")
            clipped = {}
            if run.grad_clip:  # BERT: the whole gradient's norm capped (after DDP's all-reduce)
                norm = torch.nn.utils.clip_grad_norm_(ph.model.parameters(), run.grad_clip)
                clipped = dict(grad_norm=norm.item())
            for group in ph.optimizer.param_groups:
                group["lr"] = lr
            ph.optimizer.step()
            ph.optimizer.zero_grad(set_to_none=True)
            step, tokens = step + 1, tokens + step_tokens

            tokens_per_s = step_tokens / (time.perf_counter() - t0)
            mfu = tokens_per_s * ph.flops / (ph.peak * world) if ph.peak else None
            bar.update(step_tokens)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", bs=batch_size,
                            tok_s=f"{tokens_per_s:,.0f}",
                            mfu="n/a" if mfu is None else f"{mfu:.1%}")
            write_log(ph.log, ph.number, step=step, tokens=tokens, loss=train_loss, lr=lr,
                      batch_size=batch_size, tokens_per_s=tokens_per_s, mfu=mfu, **clipped)
            if step % args.eval_every == 0:
                last_eval = evaluate(ph, step, tokens)
            if step % args.ckpt_every == 0:
                save_training_checkpoint(ph, step, tokens, position, finished=False)
    except KeyboardInterrupt:
        resume = command(args, ph.number, " --resume")
        saved = (f"{ph.ckpt_path} is intact: continue with `{resume}`"
                 if os.path.exists(ph.ckpt_path) else "no checkpoint written yet")
        raise ValueError(f"interrupted at step {step}; {saved}") from None
    bar.close()
    return end_phase(args, ph, step, tokens, position, last_eval)


def setup_phase(args, meta, start, device, rank, world):
    """Everything the loop needs: the settings, the model and optimizer, the data, the eval
    set, the speed setup, and the phase directory with its log open (rank 0)."""
    phase = args.phase
    run = phase_settings(args, start, world)
    bf16, peak, use_compile = speed_setup(device, args.dtype, args.compile)
    model, optimizer = model_and_optimizer(args, meta, start, run, device)
    data = TrainData(args.data, meta, run.seq_len, run.seed, phase, run.mask_rate)
    evals = eval_batches(args.data, meta, run.seq_len, args.eval_tokens, run.micro_batch,
                         rank, world, device, tune=args.eval_set == "tune")
    if use_compile:  # the MLPs: most FLOPs, static enough to compile once (dynamic token count)
        for block in model.layers:
            block.mlp.compile(dynamic=True)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    lengths = np.array([n for _, n in data.pieces], dtype=np.float64)  # attention: by length
    flops = model.flops_per_token((lengths ** 2).sum() / lengths.sum(), run.mask_rate)
    phase_dir = os.path.join(args.out, f"phase{phase}")
    log = None
    if rank == 0:  # the phase directory, with the tokenizer beside the model, and its log
        os.makedirs(phase_dir, exist_ok=True)
        if os.path.exists(tokenizer := os.path.join(args.data, "tokenizer.json")):
            shutil.copy(tokenizer, os.path.join(phase_dir, "tokenizer.json"))
        log = open(os.path.join(phase_dir, "log.jsonl"), "a" if start.resumed else "w")
    ph = Phase(phase, run, model, train_model, optimizer, data, evals,
               lambda: autocast_for(device, bf16), flops, peak, rank, world, phase_dir,
               os.path.join(phase_dir, "ckpt.pt"), log, dict(meta=meta, phase=phase, run=vars(run)))
    if rank == 0:
        print_banner(args, ph, start, device, bf16, use_compile)
    write_log(log, phase, event="resume" if start.resumed else "start", step=start.step,
              tokens=start.tokens, settings=vars(run), config=asdict(model.config),
              packing_efficiency=data.efficiency, device=device, bf16=bf16, processes=world,
              eval_set=args.eval_set)  # which val tokens its evals score ("tune": not the report's)
    return ph


def end_phase(args, ph, step, tokens, position, last_eval):
    """A last eval, the Hugging Face export of a finished phase, then the final checkpoint."""
    finished = tokens >= ph.run.tokens
    if not (last_eval and last_eval[0] == step):
        last_eval = evaluate(ph, step, tokens)
    val_loss, val_acc = last_eval[1]
    if finished and ph.rank == 0:
        export_hf(ph.model, ph.dir, os.path.join(args.data, "tokenizer.json"))
    # last, so that a finished checkpoint implies the export is there too
    save_training_checkpoint(ph, step, tokens, position, finished)
    if ph.rank == 0:
        print(f"phase {ph.number} {'done' if finished else 'stopped'}: step {step}, {tokens:,} "
              f"tokens, val loss {val_loss:.4f}, val acc {val_acc:.2%}; {ph.ckpt_path}"
              + (f", {ph.dir}/hf" if finished else
                 f"; continue with `{command(args, ph.number, ' --resume')}`"))
        ph.log.close()
    return {"step": step, "tokens": tokens, "val_loss": val_loss, "val_acc": val_acc,
            "finished": finished}


# ----------------------------------------------------------------------------- where a phase starts

def command(args, phase, extra=""):
    """The command line that runs `phase` on this run's data and output directory."""
    where = ("" if args.data == "data/stdlib" else f" --data {args.data}") + \
            ("" if args.out == "out" else f" --out {args.out}")
    return f"python train.py --phase {phase}{where}{extra}"


class PhaseStart:
    """What a phase starts from: `resumed` (its own checkpoint, --resume), `previous` (the phase
    before it, for phases 2 and 3), `smaller` (--init_from, a model to tile up), or nothing."""

    def __init__(self, resumed=None, previous=None, path=None, smaller=None):
        self.resumed, self.previous, self.path, self.smaller = resumed, previous, path, smaller
        self.source = resumed or previous  # the checkpoint whose model and optimizer continue
        self.continues_a_model = bool(self.source or smaller)
        self.step, self.tokens, self.position = (
            (resumed["step"], resumed["tokens"], resumed["position"]) if resumed
            else (0, 0, [0, 0]))


def phase_start(args, meta):
    phase = args.phase
    ckpt_path = os.path.join(args.out, f"phase{phase}", "ckpt.pt")
    start = PhaseStart()
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise ValueError(f"--resume: {ckpt_path} does not exist: start the phase with "
                             f"`{command(args, phase)}`")
        start = PhaseStart(resumed=read_training_checkpoint(ckpt_path), path=ckpt_path)
    elif os.path.exists(ckpt_path) and not args.overwrite:
        raise ValueError(f"{ckpt_path} exists: continue it with --resume, or start the phase "
                         "over with --overwrite")
    elif phase > 1:
        prev_path = os.path.join(args.out, f"phase{phase - 1}", "ckpt.pt")
        if not os.path.exists(prev_path):
            raise ValueError(f"phase {phase} starts from {prev_path}, which does not exist: run "
                             f"`{command(args, phase - 1)}` first")
        previous = read_training_checkpoint(prev_path)
        if not previous.get("finished"):
            raise ValueError(f"phase {phase - 1} is unfinished ({prev_path} is at "
                             f"{previous['tokens']:,} of {previous['run']['tokens']:,} tokens): "
                             f"run `{command(args, phase - 1, ' --resume')}` first")
        start = PhaseStart(previous=previous, path=prev_path)
    if args.init_from and (phase != 1 or start.resumed):
        raise ValueError("--init_from starts a fresh phase 1 from a smaller model; later phases "
                         "start from the previous one")
    if args.init_from:
        start.smaller = read_training_checkpoint(args.init_from)
        start.continues_a_model = True
        theta = start.smaller["config"]["global_theta"]
        if theta != 10_000.0:  # its global layers learned positions at 160k; phase 1 runs 10k
            raise ValueError(f"--init_from {args.init_from} is a phase {start.smaller['phase']} "
                             f"checkpoint (RoPE theta {theta:g}); tile from a phase-1 checkpoint "
                             "(theta 10k), as ModernBERT-large grew from base's phase 1")
    for ckpt, path in [(start.source, start.path), (start.smaller, args.init_from)]:
        if ckpt:
            for key in ["vocab_size"] + sorted(k for k in ckpt["meta"] if k.endswith("_id")):
                if ckpt["meta"][key] != meta.get(key):  # ids must mean the same tokens
                    raise ValueError(f"{path} was trained on data with {key}="
                                     f"{ckpt['meta'][key]}, {args.data} has {meta.get(key)}")
    return start


def phase_settings(args, start, world):
    """The run settings: phase 1 takes the preset's, phases 2 and 3 derive theirs from the
    previous phase's, --resume keeps its own; then any flag given explicitly wins."""
    if start.resumed:
        run = RunSettings(**start.resumed["run"])
    elif start.previous:
        run = derived_settings(args.phase, RunSettings(**start.previous["run"]))
    else:
        run = preset_settings(args.preset)
    for s in SETTINGS:
        value = getattr(args, s.name, None) if s.kind else None
        if value is not None and start.resumed and value != getattr(run, s.name):
            raise ValueError(f"--{s.name} {value} differs from {getattr(run, s.name)} in "
                             f"{start.path}: --resume continues a run with its own settings")
        if value is not None:
            setattr(run, s.name, value)
    if run.beta2 is None:  # the optimizer's own; a checkpoint keeps the value it ran with
        run.beta2 = OWN_BETA2[run.optimizer]
    for small in ["micro_batch", "min_batch_size"]:
        if getattr(run, small) > run.batch_size:
            raise ValueError(f"{small} {getattr(run, small)} is larger than batch_size "
                             f"{run.batch_size}: lower --{small} or raise --batch_size")
    step_size = run.micro_batch * world
    if (run.batch_size % world or run.min_batch_size % world
            or (run.batch_size - run.min_batch_size) % step_size):
        raise ValueError(f"batch sizes {run.min_batch_size} -> {run.batch_size} must be "
                         f"multiples of the {world} processes and differ by a multiple of "
                         f"micro_batch x processes = {step_size}")
    return run


def derived_settings(phase, prev):
    """Phase 2 from phase 1's settings, phase 3 from phase 2's: the paper's relations."""
    run = RunSettings(**vars(prev))
    run.warmup_tokens = run.batch_warmup_tokens = 0
    if phase == 2:  # 8x longer rows, as many tokens per batch and micro-batch, a lower LR
        # The official yamls: base 4608 -> 576 sequences in phases 2 and 3, as here; large 4928
        # -> 616, then 624 in phase 3 (a multiple of their micro-batch x 8 GPUs: ours stays 616).
        run.seq_len = prev.seq_len * LENGTH_FACTOR
        run.batch_size = max(1, prev.batch_size // LENGTH_FACTOR)
        run.micro_batch = max(1, prev.micro_batch // LENGTH_FACTOR)
        run.lr = prev.lr * prev.later_lr_factor
        run.weight_decay = prev.weight_decay * prev.later_weight_decay_factor
    run.tokens = int(prev.tokens * PAPER_TOKENS[phase] / PAPER_TOKENS[phase - 1])
    run.min_batch_size = run.batch_size  # batch-size warmup happens in phase 1 only
    return run


def model_and_optimizer(args, meta, start, run, device):
    """The model (continued, tiled up from a smaller one, or fresh) and its optimizer."""
    config = model_config(args, meta, start)
    config.global_theta = 10_000.0 if args.phase == 1 else 160_000.0  # local layers stay at 10k
    config.attn_out_dropout = run.dropout
    config.bert_dropout = run.dropout_mode == "bert"
    if config.positions != "learned" or not start.source:  # a learned table keeps its length
        config.max_seq_len = run.seq_len
    if run.seq_len > config.max_seq_len:
        raise ValueError(f"rows of {run.seq_len} tokens, but the model's learned positions stop "
                         f"at {config.max_seq_len}; only RoPE extends to a longer context "
                         f"(--seq_len {config.max_seq_len} continues at the trained length)")
    torch.manual_seed(run.seed)
    model = ModernBERT(config)
    if start.smaller:
        try:
            model.load_state_dict(tile_state_dict(start.smaller["model"],
                                                  Config(**start.smaller["config"]), model))
        except ValueError as e:
            raise ValueError(f"--init_from {args.init_from}: {e}") from None
    if start.source:
        try:
            model.load_state_dict(start.source["model"])
        except RuntimeError as e:
            raise ValueError(f"{start.path} does not fit the model: {e}") from None
    model.to(device)
    optimizer = make_optimizer(model, run.lr, run.weight_decay, run.optimizer, run.beta2)
    if start.source:
        optimizer.load_state_dict(start.source["optimizer"])  # phases 2, 3 keep Adam's moments
    optimizer.param_groups[0]["weight_decay"] = run.weight_decay
    for group in optimizer.param_groups:
        group["max_lr"] = run.lr
    return model, optimizer


def model_config(args, meta, start):
    """A continued model keeps its shape (flags may only repeat it); a new one is the preset's
    model with the flags' changes."""
    overrides = {k: v for k in MODEL_KEYS + MODEL_SWITCHES if (v := getattr(args, k)) is not None}
    if start.source:
        config = Config(**start.source["config"])
        requested = {**(asdict(config_for(args.model)) if args.model else {}), **overrides}
        for key in MODEL_KEYS + MODEL_SWITCHES:
            if key in requested and requested[key] != getattr(config, key):
                raise ValueError(f"the model in {start.path} has {key} {getattr(config, key)}, "
                                 f"the flags ask for {requested[key]}: phase {args.phase} "
                                 "continues that model")
        return config
    return config_for(args.model or PRESET_MODELS[args.preset], vocab_size=meta["vocab_size"],
                      pad_id=meta["pad_id"], cls_id=meta["cls_id"], sep_id=meta["sep_id"],
                      **overrides)


def print_banner(args, ph, start, device, bf16, use_compile):
    config, run = ph.model.config, ph.run
    origin = (f"; from {start.path}" + (f" at step {start.step}" if start.resumed else "")
              if start.source else "")
    positions = {"rope": f"RoPE theta global {config.global_theta:g} / local "
                         f"{config.local_theta:g}", "sinusoidal": "fixed sinusoidal positions",
                 "learned": f"learned positions up to {config.max_seq_len}"}[config.positions]
    print(f"phase {ph.number}: {sum(p.numel() for p in ph.model.parameters()) / 1e6:.1f}M "
          f"parameters ({config.n_layers} layers, d_model {config.d_model}, d_ff {config.d_ff}, "
          f"{config.n_heads} heads), {positions}; {device}, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"attention {ph.model.attention_backend}, compile {'on' if use_compile else 'off'}, "
          f"{ph.world} process(es){origin}")
    print(f"data {args.data}: {len(ph.data.rows):,} rows of {run.seq_len} tokens, packing "
          f"efficiency {ph.data.efficiency:.2%}; eval on {args.eval_tokens:,} val tokens, "
          "15% masked")
    warmup = f"after {run.warmup_tokens:,} warmup tokens"
    decay = f"decaying as 1 - sqrt to {DECAY_FLOOR * run.lr:g}"
    shape = {1: warmup, 2: "constant", 3: decay}
    if run.schedule == "wsd-cooldown":
        shape[1] = f"{warmup}, constant, then {decay} over the last {COOLDOWN_SHARE:.0%}"
    shape = f"{warmup}, decaying linearly to 0" if run.schedule == "linear" else shape[ph.number]
    warming = run.min_batch_size < run.batch_size and run.batch_warmup_tokens
    batch = (f"{run.min_batch_size} -> {run.batch_size} sequences over "
             f"{run.batch_warmup_tokens:,} tokens" if warming else f"{run.batch_size} sequences")
    measured = " (measured matmul)" if device == "cpu" else ""
    mfu = f"MFU against {ph.peak / 1e12:.3g} TFLOP/s{measured}" if ph.peak else "MFU n/a"
    print(f"schedule: {run.tokens:,} tokens, peak LR {run.lr:g} {shape}; batch {batch}, "
          f"micro-batch {run.micro_batch}; {mfu}")
    clip = f", gradient norm clipped at {run.grad_clip:g}" if run.grad_clip else ""
    print(f"recipe: {run.optimizer} (beta2 {run.beta2:g}){clip}, "
          f"weight decay {run.weight_decay:g}, "
          f"{run.mask_rate:.0%} masked, dropout {run.dropout:g} ({run.dropout_mode}'s places)")


def write_log(log, phase, **fields):
    """One JSON line per event in log.jsonl (rank 0 only: the other ranks have no log)."""
    if log:
        log.write(json.dumps({"phase": phase, **fields}) + "\n")
        log.flush()


# ----------------------------------------------------------------------------- schedules

def lr_at(phase, tokens, peak, warmup_tokens, total_tokens, schedule="wsd"):
    """Learning rate for a step, read at `tokens` = tokens seen once this step's batch is in (so
    warmup's first step is not zero and the decay lands exactly on its floor at the end).
    wsd: ModernBERT's warmup-stable-decay, one part per phase. linear: BERT's, in every phase a
    linear warmup (phase 1) and then a linear decay to zero at the phase's last token.
    wsd-cooldown: wsd, and phase 1 decays too, over its last COOLDOWN_SHARE."""
    if schedule == "linear":
        if tokens < warmup_tokens:
            return peak * tokens / warmup_tokens
        return peak * max(0.0, (total_tokens - tokens) / (total_tokens - warmup_tokens))
    if phase == 1:  # linear warmup, then constant (and wsd-cooldown's decay at the end)
        cooldown_start = (1 - COOLDOWN_SHARE) * total_tokens
        if schedule == "wsd-cooldown" and tokens > cooldown_start:
            return sqrt_decay(peak, (tokens - cooldown_start) / (total_tokens - cooldown_start))
        return peak * min(1.0, tokens / warmup_tokens) if warmup_tokens else peak
    if phase == 2:  # constant, no warmup
        return peak
    return sqrt_decay(peak, tokens / total_tokens)  # phase 3: the decay over the whole phase


def sqrt_decay(peak, t):
    """1 - sqrt from peak (t = 0) to DECAY_FLOOR x peak (t = 1, and after)."""
    return peak * (DECAY_FLOOR + (1 - DECAY_FLOOR) * (1 - math.sqrt(min(t, 1.0))))


def batch_size_at(tokens, min_size, max_size, step_size, warmup_tokens):
    """Batch-size warmup: min_size, min_size + step_size, ..., then max_size once warmup_tokens are
    seen (`tokens` = seen before the step). As in the official packer, each size below the
    maximum is held for a share of the warmup tokens in proportion to the size: the same number
    of optimizer steps at every size, so the small early batches do not take most of the steps."""
    if tokens >= warmup_tokens or min_size >= max_size:
        return max_size
    sizes = range(min_size, max_size, step_size)
    tokens_per_unit, cumulative = warmup_tokens / sum(sizes), 0
    for size in sizes:
        cumulative += size
        if tokens < math.ceil(tokens_per_unit * cumulative):  # the official thresholds, exactly
            return size
    return max_size


# --------------------------------------------------------------------------- data: packing, masking

class TrainData:
    """The training split packed into rows of one phase's length, visited in a seeded shuffle per
    epoch. Position = (epoch, rows used in it); every row's mask is drawn from a generator seeded
    by (seed, phase, epoch, row), so masks never depend on how rows are split among ranks."""

    def __init__(self, data_dir, meta, seq_len, seed, phase, mask_rate):
        self.tokens, offsets = load_split(data_dir, "train")
        self.pieces = document_pieces(offsets, seq_len)
        self.rows, self.efficiency = pack(self.pieces, seq_len)
        self.seed, self.phase, self.mask_rate = seed, phase, mask_rate
        self.special_ids, self.ordinary_ids = special_and_ordinary_ids(meta)
        self.mask_id = meta["mask_id"]

    def next_rows(self, position, n):
        """The next n rows as (epoch, index) keys, and the position after them."""
        (epoch, used), keys, n_rows = position, [], len(self.rows)
        while len(keys) < n:
            take = min(n - len(keys), n_rows - used)
            order = np.random.default_rng([self.seed, self.phase, epoch]).permutation(n_rows)
            keys += [(epoch, i) for i in order[used:used + take]]
            epoch, used = (epoch + 1, 0) if used + take == n_rows else (epoch, used + take)
        return keys, [epoch, used]

    def batch(self, keys, device):
        """Rows -> one packed, masked micro-batch on the device: (ids, cu_seqlens, labels)."""
        rows = [self.rows[i] for _, i in keys]
        masked = [mask_tokens(gather(self.tokens, row),
                              np.random.default_rng([self.seed, self.phase, epoch, i]),
                              self.mask_rate, self.mask_id, self.special_ids, self.ordinary_ids)
                  for (epoch, i), row in zip(keys, rows)]
        return to_device([m[0] for m in masked], [m[1] for m in masked], rows, device)


def document_pieces(offsets, seq_len):
    """(start, length) pieces of the token stream: each document whole, or, if longer than a row,
    cut into seq_len chunks and a remainder."""
    return [(s, min(seq_len, int(end) - s))
            for start, end in zip(offsets[:-1], offsets[1:])
            for s in range(int(start), int(end), seq_len)]


def pack(pieces, seq_len):
    """Greedy best-fit decreasing: longest pieces first, each into the fullest row it still fits.
    Returns rows, each a list of (start, length) pieces, and the packing efficiency."""
    rows, free = [], []  # free: sorted (space_left, row) of the rows not yet full
    for start, length in sorted(pieces, key=lambda p: -p[1]):
        i = bisect.bisect_left(free, (length, -1))
        if i == len(free):  # fits in no open row: open a new one
            rows.append([])
            space, row = seq_len, len(rows) - 1
        else:
            space, row = free.pop(i)
        rows[row].append((start, length))
        if space > length:
            bisect.insort(free, (space - length, row))
    efficiency = sum(n for _, n in pieces) / (len(rows) * seq_len) if rows else 1.0
    return rows, efficiency


def gather(array, row):
    return np.concatenate([array[s:s + n] for s, n in row]).astype(np.int64)


def mask_tokens(ids, rng, rate, mask_id, special_ids, ordinary_ids):
    """BERT's corruption: select `rate` of the ordinary tokens (never [CLS], [SEP], [PAD] or the
    other specials); of those 80% -> [MASK], 10% -> a random ordinary token, 10% left as they are.
    Returns (inputs, labels), labels -100 where nothing is predicted."""
    selected = (rng.random(len(ids)) < rate) & ~np.isin(ids, special_ids)
    action = rng.random(len(ids))
    inputs = ids.copy()
    inputs[selected & (action < 0.8)] = mask_id
    swap = selected & (action >= 0.8) & (action < 0.9)
    inputs[swap] = rng.choice(ordinary_ids, size=int(swap.sum()))
    return inputs, np.where(selected, ids, -100)


def special_and_ordinary_ids(meta):
    special = np.array(sorted({v for k, v in meta.items() if k.endswith("_id")}))
    vocab = meta["tokenizer_vocab_size"]
    return special, np.setdiff1d(np.arange(vocab), special)


def to_device(inputs, labels, rows, device):
    """Rows -> one packed stream: ids and labels (total,), cu_seqlens (n_pieces + 1,) int32."""
    cu_seqlens = cu_seqlens_of([n for row in rows for _, n in row])
    return (torch.from_numpy(np.concatenate(inputs)).to(device), cu_seqlens.to(device),
            torch.from_numpy(np.concatenate(labels)).to(device))


def first_tokens(order, offsets, n_tokens):
    """Documents, in this order, up to n_tokens (the last one cut short, so they hold exactly
    n_tokens), as (start, end) spans; and the order of the documents they leave untouched."""
    docs, n = [], 0
    for i, d in enumerate(order):
        if n >= n_tokens:
            return docs, order[i:]
        start, end = int(offsets[d]), int(min(offsets[d + 1], offsets[d] + n_tokens - n))
        docs.append((start, end))
        n += end - start
    return docs, order[len(order):]


def eval_batches(data_dir, meta, seq_len, eval_tokens, micro_batch, rank, world, device,
                 tune=False):
    """The fixed eval set: val documents in a fixed order up to eval_tokens, 15% masking
    drawn once per token position of the val stream, so the same tokens are masked the same way
    whatever the row length; packed like training. This rank's share, as device batches.
    tune: the next eval_tokens of val in that order instead, from documents the eval set does
    not touch (what --eval_set tune scores, to choose settings on)."""
    tokens, offsets = load_split(data_dir, "val")
    special_ids, ordinary_ids = special_and_ordinary_ids(meta)
    inputs, labels = mask_tokens(tokens.astype(np.int64), np.random.default_rng(EVAL_SEED), 0.15,
                                 meta["mask_id"], special_ids, ordinary_ids)
    docs, rest = first_tokens(np.random.default_rng(EVAL_SEED).permutation(len(offsets) - 1),
                              offsets, eval_tokens)
    if tune:  # settings are chosen on val documents that the reported number never sees
        docs, _ = first_tokens(rest, offsets, eval_tokens)
        if not docs:
            raise ValueError(f"--eval_set tune: val holds no documents beyond the eval set's "
                             f"{eval_tokens:,} tokens (a smaller --eval_tokens leaves some)")
    pieces = [p for start, end in sorted(docs) for p in document_pieces([start, end], seq_len)]
    rows, _ = pack(pieces, seq_len)
    rows = rows[rank::world]
    return [to_device([gather(inputs, r) for r in rows[i:i + micro_batch]],
                      [gather(labels, r) for r in rows[i:i + micro_batch]],
                      rows[i:i + micro_batch], device)
            for i in range(0, len(rows), micro_batch)]


# ----------------------------------------------------------------------------- the training step

def dropout_seed(seed, phase, step, rank):
    """Dropout's draws for one step: seeded, so a resumed run repeats them exactly."""
    return int(np.random.SeedSequence([seed, phase, step, rank]).generate_state(1)[0])


def forward_backward(model, micro_batches, world, autocast):
    """Accumulates in .grad the gradient of the global batch's mean loss over its masked tokens,
    however the batch is split into micro-batches and processes. Returns the global (loss sum,
    masked count). Each token weighs 1 / (global count): the loss never grows with the number of
    micro-batches, and the factor `world` undoes DDP's averaging of gradients over processes."""
    n_masked = torch.stack([(labels != -100).sum() for *_, labels in micro_batches]).sum().float()
    if world > 1:
        dist.all_reduce(n_masked)
    loss_sum = torch.zeros((), device=n_masked.device)
    for i, (ids, cu_seqlens, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # all-reduce once, at the end
        with model.no_sync() if world > 1 and not last else nullcontext():
            with autocast():  # the loss of this micro-batch's masked tokens, summed, computed once
                _, loss = model(ids, cu_seqlens=cu_seqlens, labels=labels, reduction="sum")
            (loss * world / n_masked).backward()
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum)
    return loss_sum, n_masked


class StableAdamW(torch.optim.Optimizer):
    """AdamW with two changes, as ModernBERT trained (optimi's StableAdamW):
    - update clipping per tensor (Adafactor's): when a gradient is large for its running second
      moment, RMS(g / sqrt(v_hat)) > 1, the tensor's step shrinks by that RMS. It replaces
      gradient clipping; nothing else is clipped.
    - fully decoupled weight decay: p *= 1 - (lr_t / lr_max) * wd, which follows the schedule's
      shape but not the LR's size (AdamW's lr_t * wd would tie the two together). lr_t is the
      clipped step size, lr_t / max(1, RMS), as in optimi: a clipped tensor decays less too."""

    def __init__(self, params, lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5):
        super().__init__(params, dict(lr=lr, max_lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, lr = group["eps"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                m, v, t = state["m"], state["v"], state["step"]
                m.lerp_(g, 1 - beta1)                               # m = b1 m + (1 - b1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)       # v = b2 v + (1 - b2) g^2
                # Four temporaries, the rest in place: on a CPU the step is memory-bound.
                v_hat = v / (1 - beta2 ** t)
                rms = (g * g).div_(v_hat.clamp(min=eps ** 2)).mean().sqrt()
                clipped_lr = lr / rms.clamp(min=1.0)  # a tensor: no host sync
                # optimi (and the official code) decay with the clipped step size too
                p.mul_(1 - clipped_lr / group["max_lr"] * group["weight_decay"])
                # p -= m_hat / (sqrt(v_hat) + eps) * clipped_lr, m_hat's 1 / (1 - b1^t) moved
                p.sub_(m.div(v_hat.sqrt_().add_(eps)).mul_(clipped_lr / (1 - beta1 ** t)))


OWN_BETA2 = {"stableadamw": 0.98, "adamw": 0.999}  # ModernBERT's and BERT's


def make_optimizer(model, lr, weight_decay, kind="stableadamw", beta2=None):
    # Matrices (the embedding included) decay; norms and biases (1-D) do not.
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    betas = (0.9, beta2 or OWN_BETA2[kind])
    if kind == "adamw":  # BERT: Adam, betas (0.9, 0.999), eps 1e-6, decay lr * wd (BERT: 0.01)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-6)
    return StableAdamW(groups, lr=lr, betas=betas)


# -------------------------------------------------------------------------- evaluation, checkpoints

@torch.no_grad()
def evaluate(ph, step, tokens):
    """(step, (val loss, val accuracy)) over the fixed eval set's masked tokens, summed over all
    ranks; logged, and printed on rank 0."""
    ph.model.eval()
    device = ph.model.decoder.weight.device
    sums = torch.zeros(3, device=device)  # loss, correct, count (float32: MPS has no float64)
    for ids, cu_seqlens, labels in ph.evals:
        with ph.autocast():
            logits, loss = ph.model(ids, cu_seqlens=cu_seqlens, labels=labels, reduction="sum")
        target = labels[labels != -100]
        sums += torch.stack([loss, (logits.argmax(-1) == target).sum().float(),
                             torch.tensor(len(target), device=device).float()])
    if ph.world > 1:
        dist.all_reduce(sums)
    ph.model.train()
    loss, acc = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    write_log(ph.log, ph.number, step=step, tokens=tokens, val_loss=loss, val_acc=acc)
    if ph.log:
        tqdm.write(f"phase {ph.number} step {step} ({tokens:,} tokens): val loss {loss:.4f}, "
                   f"val acc {acc:.2%}")
    return step, (loss, acc)


def save_training_checkpoint(ph, step, tokens, position, finished):
    """Model, optimizer and where the phase stands (meta, phase, run settings, step, tokens,
    data position, finished). No generator states: masks and dropout are seeded from (seed,
    phase, step or row). Rank 0 writes; the others wait for it."""
    if not all(torch.isfinite(p).all() for p in ph.model.parameters()):
        raise ValueError(f"the weights hold NaN/inf at step {step}; nothing saved, the last good "
                         "checkpoint is intact")
    if ph.rank == 0:
        model, optimizer = ph.model.state_dict(), ph.optimizer.state_dict()
        save_atomic(ph.ckpt_path, {"config": asdict(ph.model.config), "model": model,
                                   "optimizer": optimizer, **ph.ckpt_info, "step": step,
                                   "tokens": tokens, "position": position, "finished": finished})
    if ph.world > 1:
        dist.barrier()


def read_training_checkpoint(path):
    """A train.py checkpoint, with everything a phase needs to continue from it."""
    ckpt = load_checkpoint(path)
    missing = TRAIN_CKPT_KEYS - set(ckpt)
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint: it lacks "
                         f"{', '.join(sorted(missing))}")
    names = {s.name for s in SETTINGS}
    if set(ckpt["run"]) != names:
        raise ValueError(f"{path} was written by another version of train.py (its run settings "
                         f"differ in {', '.join(sorted(names ^ set(ckpt['run'])))}): run that "
                         "phase again with this version")
    return ckpt


# ----------------------------------------------------------------------------- tiling init

def layer_map(old_layers, new_layers):
    """Gopher's depth scaling: new layer i copies old layer round(i * L_old / L_new)."""
    return [round(i * old_layers / new_layers) for i in range(new_layers)]


def center_tile(old, shape):
    """Grow `old` to `shape`. Along each grown dimension the old tensor sits at offset
    (new - old) // 2; the slots to its right wrap around from its start, those to its left from
    its end. A dimension that does not grow is copied as it is."""
    for dim, (n_old, n_new) in enumerate(zip(old.shape, shape)):
        if n_new < n_old:
            raise ValueError(f"tiling only grows a model: dimension {dim} shrinks "
                             f"{n_old} -> {n_new}")
        index = (torch.arange(n_new) - (n_new - n_old) // 2) % n_old
        old = old.index_select(dim, index)
    return old


def tile_state_dict(old_state, old_config, new_model):
    """The larger model's weights from a smaller model's, as ModernBERT-large was started from
    base. Fused tensors are tiled part by part: Wqkv as Q, K, V; GeGLU's Wi as input and gate."""
    if old_config.vocab_size != new_model.config.vocab_size:
        raise ValueError(f"vocabularies differ: {old_config.vocab_size} vs "
                         f"{new_model.config.vocab_size}")
    depth = layer_map(old_config.n_layers, new_model.config.n_layers)
    new_state = {}
    for name, target in new_model.state_dict().items():
        source = name
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            source = f"layers.{depth[int(i)]}.{rest}"
        # Kept fresh (ones): old layer 0's missing attn_norm, and the final norm, which the
        # official code does not tile either.
        if source not in old_state or name.startswith("final_norm."):
            new_state[name] = target
            continue
        gated = 2 if new_model.config.mlp == "geglu" else 1  # BERT's GELU MLP: Wi is one part
        parts = 3 if ".attn.Wqkv." in name else gated if ".mlp.Wi." in name else 1
        shape = (target.shape[0] // parts, *target.shape[1:])
        new_state[name] = torch.cat([center_tile(p, shape) for p in old_state[source].chunk(parts)])
    new_state["decoder.weight"] = new_state["tok_embeddings.weight"]  # tied: one tensor, tiled once
    return new_state


if __name__ == "__main__":
    main()
