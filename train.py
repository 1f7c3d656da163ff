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

The file reads in the order a run executes: main() and train(), whose loop is one training step
after another; then each piece it calls, in the order it calls them.
"""
import argparse
import bisect
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from hf_format import hf_family
from modernbert import PRESETS, Config, ModernBERT, config_for, cu_seqlens_of
from prepare import load_meta, load_split

# ----------------------------------------------------------------------------- the recipe

# Phase-1 settings of each --preset; phases 2 and 3 derive theirs (see derived_settings).
TRAIN_PRESETS = {
    # A CPU, 2 cores: phase 1 in minutes. How these numbers were chosen: see the README.
    "laptop": dict(model="mini", seq_len=256, tokens=3_200_000, lr=1e-3, warmup_tokens=50_000,
                   batch_size=16, min_batch_size=4, batch_warmup_tokens=1_600_000, micro_batch=4),
    # The real shapes on one 24 GB GPU (bf16, flash-attn): the paper's lengths, LRs and warmups
    # at a smaller batch; phase 2 then runs 8192-token rows one per micro-batch.
    "base-24gb": dict(model="base", seq_len=1024, tokens=2_000_000_000, lr=8e-4,
                      warmup_tokens=30_000_000, batch_size=512, min_batch_size=64,
                      batch_warmup_tokens=100_000_000, micro_batch=8),
    "large-24gb": dict(model="large", seq_len=1024, tokens=2_000_000_000, lr=5e-4,
                       warmup_tokens=20_000_000, batch_size=512, min_batch_size=64,
                       batch_warmup_tokens=100_000_000, micro_batch=4,
                       later_lr_factor=1 / 10, later_weight_decay_factor=1 / 10),
}
# Phases 2 and 3 train at phase 1's LR and weight decay times the later_* factors: base 8e-4 ->
# 3e-4 with the same decay; large's 5e-4 proved too high, so it continued at 5e-5, decay 1e-6.
EVERY_PRESET = dict(weight_decay=1e-5, dropout=0.1, mask_rate=0.3, seed=1337,
                    later_lr_factor=3 / 8, later_weight_decay_factor=1.0)
RUN_KEYS = ["seq_len", "tokens", "lr", "warmup_tokens", "batch_size", "min_batch_size",
            "batch_warmup_tokens", "micro_batch", "weight_decay", "dropout", "mask_rate", "seed"]
# BERT's recipe, switch by switch (ModernBERT's first): the optimizer, gradient-norm clipping (0:
# none; StableAdamW clips each update instead), the LR shape, and where dropout goes. Run
# settings like the others: saved in the checkpoint, so --resume and phases 2 and 3 keep them.
RECIPE_SWITCHES = dict(optimizer=["stableadamw", "adamw"], schedule=["wsd", "linear"],
                       dropout_mode=["modernbert", "bert"])
RECIPE_DEFAULTS = dict(optimizer="stableadamw", grad_clip=0.0, schedule="wsd",
                       dropout_mode="modernbert")
LATER_KEYS = ["later_lr_factor", "later_weight_decay_factor"]  # from the preset only, no flags
MODEL_KEYS = ["n_layers", "d_model", "n_heads", "d_ff", "window", "global_every"]
# BERT's parts (modernbert.py's Config switches), as flags: a rung of ablate.py is only flags.
MODEL_SWITCHES = dict(positions=["rope", "learned"], mlp=["geglu", "gelu"],
                      bias=[False, True], prenorm=[True, False])

# The paper's token budgets in billions (1.719T, 250B, 50B). Phases 2 and 3 keep these proportions
# to the phase before them unless --tokens says otherwise.
PAPER_TOKENS = {1: 1719, 2: 250, 3: 50}
LENGTH_FACTOR = 8                 # context extension: 1024 -> 8192
DECAY_FLOOR = 0.001               # phase 3 ends at 0.001 x its peak LR
EVAL_SEED = 1234                  # fixed, so evals compare across steps, runs, phases and --seed
TRAIN_CKPT_KEYS = {"config", "model", "meta", "phase", "run", "optimizer", "step", "tokens",
                   "position"}


def main(argv=None):
    args = get_args(argv)  # the flags are listed at the end of the file
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        return train(args, device, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def train(args, device, rank, world):
    """One phase: where it starts, its settings, the model, the data; then the training loop."""
    phase, master = args.phase, rank == 0
    meta = read_meta(args.data)
    start = phase_start(args, meta)  # its own checkpoint (--resume), the previous phase's, or none
    s = phase_settings(args, start, world)  # s: seq_len, tokens, lr, batch sizes, ... (RUN_KEYS)
    bf16, peak, use_compile = speed_setup(device, args.dtype, args.compile)
    model, optimizer = model_and_optimizer(args, meta, start, s, device)
    data = TrainData(args.data, meta, s["seq_len"], s["seed"], phase, s["mask_rate"])
    evals = eval_batches(args.data, meta, s["seq_len"], args.eval_tokens, s["micro_batch"],
                         rank, world, device)
    if use_compile:  # the MLPs: most FLOPs, static enough to compile once (dynamic token count)
        for block in model.layers:
            block.mlp.compile(dynamic=True)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    autocast = lambda: (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16
                        else nullcontext())
    # attention FLOPs by real doc length
    lengths = np.array([n for _, n in data.pieces], dtype=np.float64)
    flops = model.flops_per_token((lengths ** 2).sum() / lengths.sum(), s["mask_rate"])
    phase_dir = os.path.join(args.out, f"phase{phase}")
    ckpt_path = os.path.join(phase_dir, "ckpt.pt")
    log = open_log(phase_dir, args.data, append=start.resumed) if master else None
    if master:
        print_banner(args, model, s, data, start, device, bf16, peak, use_compile, world)
    write_log(log, phase, event="resume" if start.resumed else "start", step=start.step,
              tokens=start.tokens, settings=s, config=asdict(model.config),
              packing_efficiency=data.efficiency, device=device, bf16=bf16, processes=world)
    ckpt_info = dict(meta=meta, phase=phase, run=s)  # what every checkpoint of this phase holds too

    # ---- the loop: batch -> forward/backward -> optimizer step -> log -> eval -> checkpoint
    step, tokens, position = start.step, start.tokens, start.position
    step_size = s["micro_batch"] * world  # the batch grows one micro-batch per process at a time
    model.train()
    bar = tqdm(total=s["tokens"], initial=min(tokens, s["tokens"]), unit="tok", unit_scale=True,
               desc=f"phase {phase}", disable=not master, dynamic_ncols=True)
    # A model that did not start from scratch is evaluated first: phases 2 and 3 show what the
    # longer rows and the new theta do before any training; --init_from shows the tiled model.
    last_eval = None  # (step, (val loss, val acc))
    if start.continues_a_model and not start.resumed:
        last_eval = (step, evaluate(model, evals, autocast, world))
        report_eval(log, phase, step, tokens, *last_eval[1])
    try:
        while tokens < s["tokens"] and (args.max_steps is None or step < args.max_steps):
            t0 = time.perf_counter()
            batch_size = batch_size_at(tokens, s["min_batch_size"], s["batch_size"], step_size,
                                       s["batch_warmup_tokens"])
            keys, position = data.take(position, batch_size)
            step_tokens = sum(n for _, i in keys for _, n in data.rows[i])
            lr = lr_at(phase, tokens + step_tokens, s["lr"], s["warmup_tokens"], s["tokens"],
                       s["schedule"])
            mine = keys[rank::world]  # this process's share of the global batch
            micro_batches = [data.batch(mine[i:i + s["micro_batch"]], device)
                             for i in range(0, len(mine), s["micro_batch"])]
            torch.manual_seed(dropout_seed(s["seed"], phase, step, rank))
            loss_sum, n_masked = forward_backward(train_model, micro_batches, world, autocast)
            train_loss = (loss_sum / n_masked).item()
            if not math.isfinite(train_loss):
                fail(f"loss is {train_loss} at step {step + 1}; stopped before the update, the "
                     "last good checkpoint "
                     f"({ckpt_path if os.path.exists(ckpt_path) else 'none yet'}) is intact. "
                     "Try a lower --lr")
            clipped = {}
            if s["grad_clip"]:  # BERT: the whole gradient's norm capped (after DDP's all-reduce)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
                clipped = dict(grad_norm=norm.item())
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, tokens = step + 1, tokens + step_tokens

            tokens_per_s = step_tokens / (time.perf_counter() - t0)
            mfu = tokens_per_s * flops / (peak * world) if peak else None
            bar.update(step_tokens)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", bs=batch_size,
                            tok_s=f"{tokens_per_s:,.0f}",
                            mfu="n/a" if mfu is None else f"{mfu:.1%}")
            write_log(log, phase, step=step, tokens=tokens, loss=train_loss, lr=lr,
                      batch_size=batch_size, tokens_per_s=tokens_per_s, mfu=mfu, **clipped)
            if step % args.eval_every == 0:
                last_eval = (step, evaluate(model, evals, autocast, world))
                report_eval(log, phase, step, tokens, *last_eval[1])
            if step % args.ckpt_every == 0:
                progress = dict(step=step, tokens=tokens, position=position, finished=False)
                save_training_checkpoint(ckpt_path, model, optimizer,
                                         {**ckpt_info, **progress}, world)
    except KeyboardInterrupt:
        saved = (f"{ckpt_path} is intact: continue with `{command(args, phase, ' --resume')}`"
                 if os.path.exists(ckpt_path) else "no checkpoint written yet")
        fail(f"interrupted at step {step}; {saved}")
    bar.close()

    # ---- the end of the phase: a last eval, the Hugging Face export, the final checkpoint
    finished = tokens >= s["tokens"]
    if not (last_eval and last_eval[0] == step):
        last_eval = (step, evaluate(model, evals, autocast, world))
        report_eval(log, phase, step, tokens, *last_eval[1])
    val_loss, val_acc = last_eval[1]
    if finished and master:
        export_hf(model, phase_dir, os.path.join(args.data, "tokenizer.json"))
    progress = dict(step=step, tokens=tokens, position=position, finished=finished)
    # last, so that a finished checkpoint implies the export is there too
    save_training_checkpoint(ckpt_path, model, optimizer, {**ckpt_info, **progress}, world)
    if master:
        print(f"phase {phase} {'done' if finished else 'stopped'}: step {step}, {tokens:,} tokens, "
              f"val loss {val_loss:.4f}, val acc {val_acc:.2%}; {ckpt_path}"
              + (f", {phase_dir}/hf" if finished else
                 f"; continue with `{command(args, phase, ' --resume')}`"))
        log.close()
    return {"step": step, "tokens": tokens, "val_loss": val_loss, "val_acc": val_acc,
            "finished": finished}


# ----------------------------------------------------------------------------- where a phase starts

def read_meta(data_dir):
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        fail(f"no prepared data in {data_dir}/ (meta.json missing): run `python prepare.py"
             + ("" if data_dir == "data/stdlib" else f" --out {data_dir}") + "` first")
    return load_meta(data_dir)


def command(args, phase, extra=""):
    """The command line that runs `phase` on this run's data and output directory."""
    where = ("" if args.data == "data/stdlib" else f" --data {args.data}") + \
            ("" if args.out == "out" else f" --out {args.out}")
    return f"python train.py --phase {phase}{where}{extra}"


class PhaseStart:
    """What a phase starts from: `resumed` (its own checkpoint, --resume), `previous` (the phase
    before it, for phases 2 and 3), `small` (--init_from, a model to tile up), or nothing."""

    def __init__(self, resumed=None, previous=None, path=None, small=None):
        self.resumed, self.previous, self.path, self.small = resumed, previous, path, small
        self.source = resumed or previous  # the checkpoint whose model and optimizer continue
        self.continues_a_model = bool(self.source or small)
        self.step, self.tokens, self.position = (
            (resumed["step"], resumed["tokens"], resumed["position"]) if resumed
            else (0, 0, [0, 0]))


def phase_start(args, meta):
    phase = args.phase
    ckpt_path = os.path.join(args.out, f"phase{phase}", "ckpt.pt")
    start = PhaseStart()
    if args.resume:
        if not os.path.exists(ckpt_path):
            fail(f"--resume: {ckpt_path} does not exist: start the phase with "
                 f"`{command(args, phase)}`")
        start = PhaseStart(resumed=read_training_checkpoint(ckpt_path), path=ckpt_path)
    elif os.path.exists(ckpt_path) and not args.overwrite:
        fail(f"{ckpt_path} exists: continue it with --resume, or start the phase over with "
             "--overwrite")
    elif phase > 1:
        prev_path = os.path.join(args.out, f"phase{phase - 1}", "ckpt.pt")
        if not os.path.exists(prev_path):
            fail(f"phase {phase} starts from {prev_path}, which does not exist: run "
                 f"`{command(args, phase - 1)}` first")
        previous = read_training_checkpoint(prev_path)
        if not previous.get("finished"):
            fail(f"phase {phase - 1} is unfinished ({prev_path} is at {previous['tokens']:,} of "
                 f"{previous['run']['tokens']:,} tokens): run "
                 f"`{command(args, phase - 1, ' --resume')}` first")
        start = PhaseStart(previous=previous, path=prev_path)
    if args.init_from and (phase != 1 or start.resumed):
        fail("--init_from starts a fresh phase 1 from a smaller model; later phases start from "
             "the previous one")
    if args.init_from:
        start.small = read_training_checkpoint(args.init_from)
        start.continues_a_model = True
        if start.small["config"]["global_theta"] != 10_000.0:
            # Its global layers learned positions at theta 160k; phase 1 runs them at 10k.
            fail(f"--init_from {args.init_from} is a phase {start.small['phase']} checkpoint (global RoPE theta "
                 f"{start.small['config']['global_theta']:g}); tile from a phase-1 checkpoint (theta 10k), "
                 "as ModernBERT-large was grown from base's phase 1")
    for ckpt, path in [(start.source, start.path), (start.small, args.init_from)]:
        if ckpt:
            for key in ["vocab_size"] + sorted(k for k in ckpt["meta"] if k.endswith("_id")):
                if ckpt["meta"][key] != meta.get(key):  # ids must mean the same tokens
                    fail(f"{path} was trained on data with {key}={ckpt['meta'][key]}, "
                         f"{args.data} has {meta.get(key)}")
    return start


def phase_settings(args, start, world):
    """The run settings (RUN_KEYS): phase 1 takes the preset's, phase 2 and 3 derive theirs from the
    previous phase's, --resume keeps its own; then any flag given explicitly wins."""
    if start.resumed:
        settings = dict(start.resumed["run"])
    elif start.previous:
        settings = derived_settings(args.phase, start.previous["run"])
    else:
        preset = TRAIN_PRESETS[args.preset]
        settings = {**EVERY_PRESET, **{k: v for k, v in preset.items() if k in RUN_KEYS + LATER_KEYS}}
    settings = {**RECIPE_DEFAULTS, **settings}  # (checkpoints from before the recipe switches)
    for key in RUN_KEYS + list(RECIPE_DEFAULTS):
        value = getattr(args, key)
        if value is not None and start.resumed and value != settings[key]:
            fail(f"--{key} {value} differs from {settings[key]} in {start.path}: --resume "
                 "continues a run with its own settings")
        settings[key] = settings[key] if value is None else value
    s = settings
    for small, large in [("micro_batch", "batch_size"), ("min_batch_size", "batch_size")]:
        if s[small] > s[large]:
            fail(f"{small} {s[small]} is larger than {large} {s[large]}: lower --{small} or raise --{large}")
    step_size = s["micro_batch"] * world
    if (s["batch_size"] % world or s["min_batch_size"] % world
            or (s["batch_size"] - s["min_batch_size"]) % step_size):
        fail(f"batch sizes {s['min_batch_size']} -> {s['batch_size']} must be multiples of the "
             f"{world} processes and differ by a multiple of micro_batch x processes = {step_size}")
    return settings


def derived_settings(phase, prev):
    """Phase 2 from phase 1's settings, phase 3 from phase 2's: the paper's relations."""
    s = dict(prev, warmup_tokens=0, batch_warmup_tokens=0)
    if phase == 2:  # 8x longer rows, as many tokens per batch and micro-batch, a lower LR
        # The official yamls: base 4608 -> 576 sequences in phases 2 and 3, as derived here; large
        # 4928 -> 616 in phase 2 (also as derived) and 624 in phase 3 (ours stays at 616: 624 is
        # a multiple of their micro-batch x 8 GPUs, not a relation between phases).
        s["seq_len"] = prev["seq_len"] * LENGTH_FACTOR
        s["batch_size"] = max(1, prev["batch_size"] // LENGTH_FACTOR)
        s["micro_batch"] = max(1, prev["micro_batch"] // LENGTH_FACTOR)
        s["lr"] = prev["lr"] * prev.get("later_lr_factor", EVERY_PRESET["later_lr_factor"])
        s["weight_decay"] = prev["weight_decay"] * prev.get("later_weight_decay_factor", 1.0)
    s["tokens"] = int(prev["tokens"] * PAPER_TOKENS[phase] / PAPER_TOKENS[phase - 1])
    s["min_batch_size"] = s["batch_size"]  # batch-size warmup happens in phase 1 only
    return s


def model_and_optimizer(args, meta, start, s, device):
    """The model (continued, tiled up from a smaller one, or fresh) and its optimizer."""
    config = model_config(args, meta, start)
    config.global_theta = 10_000.0 if args.phase == 1 else 160_000.0  # local layers stay at 10k
    config.attn_out_dropout = s["dropout"]
    config.bert_dropout = s["dropout_mode"] == "bert"
    if config.positions == "rope" or not start.source:  # a learned table keeps its trained length
        config.max_seq_len = s["seq_len"]
    if s["seq_len"] > config.max_seq_len:
        fail(f"rows of {s['seq_len']} tokens, but the model's learned positions stop at "
             f"{config.max_seq_len}; only RoPE extends to a longer context (--seq_len "
             f"{config.max_seq_len} continues at the trained length)")
    torch.manual_seed(s["seed"])
    model = ModernBERT(config)
    if start.small:
        try:
            model.load_state_dict(tile_state_dict(start.small["model"],
                                                  Config(**start.small["config"]), model))
        except ValueError as e:
            fail(f"--init_from {args.init_from}: {e}")
    if start.source:
        try:
            model.load_state_dict(start.source["model"])
        except RuntimeError as e:
            fail(f"{start.path} does not fit the model: {e}")
    model.to(device)
    optimizer = make_optimizer(model, s["lr"], s["weight_decay"], s["optimizer"])
    if start.source:
        optimizer.load_state_dict(start.source["optimizer"])  # phases 2 and 3 keep Adam's moments
    optimizer.param_groups[0]["weight_decay"] = s["weight_decay"]
    for group in optimizer.param_groups:
        group["max_lr"] = s["lr"]
    return model, optimizer


def model_config(args, meta, start):
    """A continued model keeps its shape (flags may only repeat it); a new one is the preset's
    model with the flags' changes."""
    overrides = {k: getattr(args, k) for k in MODEL_KEYS + list(MODEL_SWITCHES)
                 if getattr(args, k) is not None}
    if start.source:
        config = Config(**start.source["config"])
        requested = {**(asdict(config_for(args.model)) if args.model else {}), **overrides}
        for key in MODEL_KEYS + list(MODEL_SWITCHES):
            if key in requested and requested[key] != getattr(config, key):
                fail(f"the model in {start.path} has {key} {getattr(config, key)}, the flags ask "
                     f"for {requested[key]}: phase {args.phase} continues that model")
        return config
    model = args.model or TRAIN_PRESETS[args.preset]["model"]
    return config_for(model, vocab_size=meta["vocab_size"], pad_id=meta["pad_id"],
                      cls_id=meta["cls_id"], sep_id=meta["sep_id"], **overrides)


def print_banner(args, model, s, data, start, device, bf16, peak, use_compile, world):
    c, phase = model.config, args.phase
    origin = ((f"; from {start.path}" + (f" at step {start.step}" if start.resumed else ""))
              if start.source else "")
    positions = (f"RoPE theta global {c.global_theta:g} / local {c.local_theta:g}"
                 if c.positions == "rope" else f"learned positions up to {c.max_seq_len}")
    print(f"phase {phase}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"({c.n_layers} layers, d_model {c.d_model}, d_ff {c.d_ff}, {c.n_heads} heads), "
          f"{positions}; {device}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, attention {model.attention_backend}, "
          f"compile {'on' if use_compile else 'off'}, {world} process(es){origin}")
    print(f"data {args.data}: {len(data.rows):,} rows of {s['seq_len']} tokens, packing efficiency "
          f"{data.efficiency:.2%}; eval on {args.eval_tokens:,} val tokens, 15% masked")
    shape = {1: f"after {s['warmup_tokens']:,} warmup tokens", 2: "constant",
             3: f"decaying as 1 - sqrt to {DECAY_FLOOR * s['lr']:g}"}[phase]
    if s["schedule"] == "linear":
        shape = f"after {s['warmup_tokens']:,} warmup tokens, decaying linearly to 0"
    batch = (f"{s['min_batch_size']} -> {s['batch_size']} sequences over "
             f"{s['batch_warmup_tokens']:,} tokens"
             if s["min_batch_size"] < s["batch_size"] and s["batch_warmup_tokens"]
             else f"{s['batch_size']} sequences")
    mfu = (f"MFU against {peak / 1e12:.3g} TFLOP/s{' (measured matmul)' if device == 'cpu' else ''}"
           if peak else "MFU n/a")
    print(f"schedule: {s['tokens']:,} tokens, peak LR {s['lr']:g} {shape}; batch {batch}, "
          f"micro-batch {s['micro_batch']}; {mfu}")
    clip = f", gradient norm clipped at {s['grad_clip']:g}" if s["grad_clip"] else ""
    print(f"recipe: {s['optimizer']}{clip}, weight decay {s['weight_decay']:g}, "
          f"{s['mask_rate']:.0%} masked, dropout {s['dropout']:g} ({s['dropout_mode']}'s places)")


def open_log(phase_dir, data_dir, append):
    """The phase directory with the tokenizer beside the model, and its log.jsonl, open."""
    os.makedirs(phase_dir, exist_ok=True)
    if os.path.exists(os.path.join(data_dir, "tokenizer.json")):
        shutil.copy(os.path.join(data_dir, "tokenizer.json"),
                    os.path.join(phase_dir, "tokenizer.json"))
    return open(os.path.join(phase_dir, "log.jsonl"), "a" if append else "w")


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
    linear warmup (phase 1) and then a linear decay to zero at the phase's last token."""
    if schedule == "linear":
        if tokens < warmup_tokens:
            return peak * tokens / warmup_tokens
        return peak * max(0.0, (total_tokens - tokens) / (total_tokens - warmup_tokens))
    if phase == 1:  # linear warmup, then constant
        return peak * min(1.0, tokens / warmup_tokens) if warmup_tokens else peak
    if phase == 2:  # constant, no warmup
        return peak
    t = min(tokens, total_tokens) / total_tokens  # phase 3: 1 - sqrt decay over the whole phase
    return peak * (DECAY_FLOOR + (1 - DECAY_FLOOR) * (1 - math.sqrt(t)))


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

    def order(self, epoch):
        return np.random.default_rng([self.seed, self.phase, epoch]).permutation(len(self.rows))

    def take(self, position, n):
        """The next n rows as (epoch, index) keys, and the position after them."""
        epoch, used = position
        keys = []
        while len(keys) < n:
            take = min(n - len(keys), len(self.rows) - used)
            keys += [(epoch, i) for i in self.order(epoch)[used:used + take]]
            epoch, used = (epoch + 1, 0) if used + take == len(self.rows) else (epoch, used + take)
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
    vocab = meta.get("tokenizer_vocab_size", meta["vocab_size"])
    return special, np.setdiff1d(np.arange(vocab), special)


def to_device(inputs, labels, rows, device):
    """Rows -> one packed stream: ids and labels (total,), cu_seqlens (n_pieces + 1,) int32."""
    cu_seqlens = cu_seqlens_of([n for row in rows for _, n in row])
    return (torch.from_numpy(np.concatenate(inputs)).to(device), cu_seqlens.to(device),
            torch.from_numpy(np.concatenate(labels)).to(device))


def eval_batches(data_dir, meta, seq_len, eval_tokens, micro_batch, rank, world, device):
    """The fixed eval set: val documents in a fixed order up to eval_tokens, 15% masking
    drawn once per token position of the val stream, so the same tokens are masked the same way
    whatever the row length; packed like training. This rank's share, as device batches."""
    tokens, offsets = load_split(data_dir, "val")
    special_ids, ordinary_ids = special_and_ordinary_ids(meta)
    inputs, labels = mask_tokens(tokens.astype(np.int64), np.random.default_rng(EVAL_SEED), 0.15,
                                 meta["mask_id"], special_ids, ordinary_ids)
    docs, n = [], 0
    for d in np.random.default_rng(EVAL_SEED).permutation(len(offsets) - 1):
        if n >= eval_tokens:
            break
        start, end = int(offsets[d]), int(min(offsets[d + 1], offsets[d] + eval_tokens - n))
        docs.append((start, end))  # the last one cut short, so the set holds exactly eval_tokens
        n += end - start
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
                m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
                rms = (g * g / v_hat.clamp(min=eps ** 2)).mean().sqrt()
                clipped_lr = lr / rms.clamp(min=1.0)  # a tensor: no host sync
                # optimi (and the official code) decay with the clipped step size too
                p.mul_(1 - clipped_lr / group["max_lr"] * group["weight_decay"])
                p.sub_(m_hat / (v_hat.sqrt() + eps) * clipped_lr)


def make_optimizer(model, lr, weight_decay, kind="stableadamw"):
    # Matrices (the embedding included) decay; norms and biases (1-D) do not.
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    if kind == "adamw":  # BERT: Adam, betas (0.9, 0.999), eps 1e-6, decay lr * wd (BERT: 0.01)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    return StableAdamW(groups, lr=lr)


# -------------------------------------------------------------------------- evaluation, checkpoints

@torch.no_grad()
def evaluate(model, evals, autocast, world):
    """(val loss, val accuracy) over the fixed eval set's masked tokens, summed over all ranks."""
    model.eval()
    device = model.decoder.weight.device
    sums = torch.zeros(3, device=device)  # loss, correct, count (float32: MPS has no float64)
    for ids, cu_seqlens, labels in evals:
        with autocast():
            logits, loss = model(ids, cu_seqlens=cu_seqlens, labels=labels, reduction="sum")
        target = labels[labels != -100]
        sums += torch.stack([loss,
                             (logits.argmax(-1) == target).sum().float(),
                             torch.tensor(len(target), device=device).float()])
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def report_eval(log, phase, step, tokens, loss, acc):
    write_log(log, phase, step=step, tokens=tokens, val_loss=loss, val_acc=acc)
    if log:
        tqdm.write(f"phase {phase} step {step} ({tokens:,} tokens): val loss {loss:.4f}, "
                   f"val acc {acc:.2%}")


def save_training_checkpoint(path, model, optimizer, info, world):
    """Model, optimizer and where the phase stands (info: meta, phase, run settings, step, tokens,
    data position, finished). No generator states: masks and dropout are seeded from (seed,
    phase, step or row). Rank 0 writes; the others wait for it."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        fail(f"the weights hold NaN/inf at step {info['step']}; nothing saved, the last good "
             "checkpoint is intact")
    if world == 1 or dist.get_rank() == 0:
        save_checkpoint(path, {"config": asdict(model.config), "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(), **info})
    if world > 1:
        dist.barrier()


def save_checkpoint(path, state):
    """Atomic: write a temporary file, flush it to disk, then rename it over the old checkpoint.
    An interrupt at any moment leaves either the old checkpoint or the new one, never a mix."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """A checkpoint's dict. weights_only=True: tensors and plain containers only, so a file from
    anywhere cannot run code while it loads. ValueError if it is not a readable model checkpoint.
    State-dict names saved from torch.compile or DDP ("_orig_mod.", "module.") are made plain."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch each raise their own kind for a foreign file
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "Unsupported global" in str(e):  # not torch's advice, which says to retry unsafely
            why = "it holds Python objects beyond tensors and plain containers, which could run code"
        elif "weights_only" in str(e):
            why = "not a file torch.save wrote"
        raise ValueError(f"{path!r} is not a model checkpoint, or is corrupted ({type(e).__name__}: {why})")
    if not isinstance(ckpt, dict) or not {"config", "model"} <= ckpt.keys():
        raise ValueError(f"{path!r} is not a model checkpoint: no 'config' and 'model' entries")
    state = {}
    for name, tensor in ckpt["model"].items():
        while name.startswith(("_orig_mod.", "module.")):
            name = name.split(".", 1)[1]
        state[name] = tensor
    ckpt["model"] = state
    return ckpt


def read_training_checkpoint(path):
    """A train.py checkpoint, with everything a phase needs to continue from it."""
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        fail(str(e))
    missing = TRAIN_CKPT_KEYS - set(ckpt)
    if missing:
        fail(f"{path} is not a train.py checkpoint: it lacks {', '.join(sorted(missing))}")
    return ckpt


def export_hf(model, out_dir, tokenizer):
    """The phase's Hugging Face directory, written beside and then swapped in. A model that mixes
    BERT's parts with ModernBERT's (an ablate.py rung) has no transformers class: none is written."""
    final, tmp = os.path.join(out_dir, "hf"), os.path.join(out_dir, "hf.tmp")
    try:
        hf_family(model.config)
    except ValueError as e:
        tqdm.write(f"no {final}/: {e}")
        return
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if os.path.exists(tokenizer):
        shutil.copy(tokenizer, os.path.join(tmp, "tokenizer.json"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def fail(message):
    raise SystemExit(f"train.py: error: {message}")


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


# ----------------------------------------------------------------------------- device, speed

def pick_device(name="auto"):
    """"auto": CUDA, else Apple's MPS, else the CPU; any other name is used as it is."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


# Dense bf16 tensor-core peaks (FLOP/s), for MFU. The first name found in the device's wins.
GPU_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12),
                  ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
                  ("A6000", 155e12), ("4090", 165e12), ("3090", 71e12)]


def matmul_flops(dtype, device="cpu", n=1024, seconds=0.25):
    """The device's practical peak: the fastest of repeated n x n matmuls (the fastest, so that a
    moment of competition from other programs does not lower it). For MFU and the bf16 choice."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device),
            torch.randn(n, n, dtype=dtype, device=device))
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else lambda: None
    a @ b
    best, stop = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < stop:
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def speed_setup(device, dtype, compile_flag):
    """(use bf16 autocast, peak FLOP/s or None, compile) for this device."""
    kind = device.split(":")[0]
    if kind == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((f for key, f in GPU_PEAK_FLOPS if key in name), None)
        bf16 = dtype == "bf16" or (dtype == "auto" and torch.cuda.is_bf16_supported())
    elif kind == "cpu":  # bf16 autocast is fast on CPUs with bf16 matmul units, else slow: measure
        fp32_speed = matmul_flops(torch.float32)
        bf16_speed = matmul_flops(torch.bfloat16) if dtype != "fp32" else 0.0
        bf16 = dtype == "bf16" or (dtype == "auto" and bf16_speed > 1.2 * fp32_speed)
        peak = bf16_speed if bf16 else fp32_speed
    else:  # MPS: no reliable peak to quote
        peak, bf16 = None, dtype == "bf16"
    use_compile = compile_flag == "on" or (compile_flag == "auto" and kind == "cuda"
                                           and sys.platform != "win32")
    return bf16, peak, use_compile


# ----------------------------------------------------------------------------- the command line

def get_args(argv):
    p = argparse.ArgumentParser(prog="train.py", description="ModernBERT's three-phase MLM pretraining. "
                                            "Run --phase 1, 2, 3 in turn.")
    p.add_argument("--phase", type=int, choices=[1, 2, 3], default=1,
                   help="1: pretrain at the base length; 2: context extension (8x length, "
                        "global theta 160k); 3: LR decay (default: %(default)s)")
    p.add_argument("--data", default="data/stdlib",
                   help="prepare.py's output directory (default: %(default)s)")
    p.add_argument("--out", default="out",
                   help="run directory; phase N writes OUT/phaseN (default: %(default)s)")
    p.add_argument("--preset", choices=TRAIN_PRESETS, default="laptop",
                   help="phase-1 recipe: laptop (CPU, minutes), base-24gb / large-24gb (the "
                        "paper's shapes on one 24 GB GPU) (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue this phase from its ckpt.pt, exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="start this phase over even if its ckpt.pt exists")
    p.add_argument("--init_from", metavar="CKPT",
                   help="phase 1: start from a smaller model's ckpt.pt, tiled up")
    g = p.add_argument_group("model (phase 1 only; later phases continue phase 1's model)")
    g.add_argument("--model", choices=PRESETS,
                   help="modernbert.py's model preset (default: --preset's)")
    for key in MODEL_KEYS:
        g.add_argument(f"--{key}", type=int, help=f"override the preset's {key}")
    g.add_argument("--positions", choices=MODEL_SWITCHES["positions"],
                   help="rope (ModernBERT) or learned (BERT: an absolute position table)")
    g.add_argument("--mlp", choices=MODEL_SWITCHES["mlp"], help="geglu (ModernBERT) or gelu (BERT)")
    g.add_argument("--bias", type=on_off, metavar="{on,off}",
                   help="biases in linear layers and norms (BERT: on; ModernBERT: off)")
    g.add_argument("--prenorm", type=on_off, metavar="{on,off}",
                   help="pre-norm blocks (ModernBERT: on) or post-norm (BERT: off)")
    g = p.add_argument_group("run settings (default: --preset's in phase 1, derived from the "
                             "previous phase in 2 and 3)")
    count = lambda s: int(float(s))  # accepts 3e6
    g.add_argument("--seq_len", type=int, help="row length in tokens (phase 2: 8x phase 1's)")
    g.add_argument("--tokens", type=count,
                   help="token budget of the phase (phases 2, 3: the paper's proportions)")
    g.add_argument("--lr", type=float, help="peak learning rate (phases 2, 3: phase 1's x 3/8, large's x 1/10)")
    g.add_argument("--warmup_tokens", type=count, help="phase 1: linear LR warmup, in tokens")
    g.add_argument("--batch_size", type=int,
                   help="global batch in sequences (phase 2: phase 1's / 8)")
    g.add_argument("--min_batch_size", type=int, help="phase 1: batch-size warmup starts here")
    g.add_argument("--batch_warmup_tokens", type=count,
                   help="phase 1: tokens over which the batch grows")
    g.add_argument("--micro_batch", type=int, help="sequences per forward pass and process")
    g.add_argument("--weight_decay", type=float,
                   help=f"decoupled weight decay (default {EVERY_PRESET['weight_decay']})")
    g.add_argument("--dropout", type=float,
                   help=f"attention-output dropout (default {EVERY_PRESET['dropout']})")
    g.add_argument("--mask_rate", type=float,
                   help=f"share of tokens masked in training (default {EVERY_PRESET['mask_rate']})")
    g.add_argument("--optimizer", choices=RECIPE_SWITCHES["optimizer"],
                   help="stableadamw (ModernBERT) or adamw (BERT: torch's AdamW, betas 0.9, "
                        "0.999, eps 1e-6; pair it with --grad_clip 1 --weight_decay 0.01) "
                        "(default stableadamw)")
    g.add_argument("--grad_clip", type=float,
                   help="clip the gradient's global norm to this before each step; 0: off "
                        "(BERT: 1.0) (default 0)")
    g.add_argument("--schedule", choices=RECIPE_SWITCHES["schedule"],
                   help="LR shape: wsd (ModernBERT: warmup, constant, then phase 3's decay) or "
                        "linear (BERT: warmup, then linear decay to 0 in each phase) "
                        "(default wsd)")
    g.add_argument("--dropout_mode", choices=RECIPE_SWITCHES["dropout_mode"],
                   help="where --dropout applies: modernbert (the attention output only) or bert "
                        "(also embeddings, attention probabilities, MLP output) "
                        "(default modernbert)")
    g.add_argument("--seed", type=int,
                   help=f"seed of init, data order, masks and dropout "
                        f"(default {EVERY_PRESET['seed']})")
    g = p.add_argument_group("running")
    g.add_argument("--eval_every", type=int, default=200,
                   help="steps between evals (default: %(default)s)")
    g.add_argument("--eval_tokens", type=count, default=65536,
                   help="size of the fixed eval set (default: %(default)s)")
    g.add_argument("--ckpt_every", type=int, default=200,
                   help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--max_steps", type=int,
                   help="stop after this step, resumable, even if tokens remain")
    g.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), or a torch device")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast; auto: on CUDA with bf16, on a CPU where bf16 matmuls "
                        "measure faster")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the MLPs; auto: on for CUDA, not on Windows "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def on_off(text):
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def check_args(p, args):
    """Every numeric flag in its range, before anything is read, trained or written: argparse's
    one-line error and exit status 2. (Settings that come from a checkpoint are checked against
    the merged values in phase_settings.)"""
    at_least = dict(seq_len=16, tokens=1, batch_size=1, min_batch_size=1, micro_batch=1, eval_every=1,
                    eval_tokens=1, ckpt_every=1, max_steps=0, warmup_tokens=0, batch_warmup_tokens=0,
                    **{key: 1 for key in MODEL_KEYS})
    for key, low in at_least.items():
        value = getattr(args, key)
        if value is not None and value < low:
            why = " (a row holds [CLS] ... [SEP] and tokens to mask)" if key == "seq_len" else ""
            p.error(f"--{key} must be at least {low}{why}, got {value}")
    for key, ok, rule in [("lr", lambda v: v > 0, "positive"), ("weight_decay", lambda v: v >= 0, "at least 0"),
                          ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
                          ("mask_rate", lambda v: 0 < v < 1, "in (0, 1)"),
                          ("grad_clip", lambda v: v >= 0, "at least 0")]:
        value = getattr(args, key)
        if value is not None and not ok(value):
            p.error(f"--{key} must be {rule}, got {value}")
    if args.batch_size and args.micro_batch and args.micro_batch > args.batch_size:
        p.error(f"--micro_batch {args.micro_batch} is larger than --batch_size {args.batch_size}")
    if args.batch_size and args.min_batch_size and args.min_batch_size > args.batch_size:
        p.error(f"--min_batch_size {args.min_batch_size} is larger than --batch_size {args.batch_size}")
    shape = {k: getattr(args, k) for k in MODEL_KEYS + list(MODEL_SWITCHES)
             if getattr(args, k) is not None}
    try:  # a model shape that cannot exist (heads that do not divide d_model, an odd window, ...)
        config_for(args.model or TRAIN_PRESETS[args.preset]["model"], **shape)
    except ValueError as e:
        p.error(str(e))
    if args.device != "auto":
        kind = args.device.split(":")[0]
        if kind not in ("cpu", "cuda", "mps") or (kind == "cuda" and not torch.cuda.is_available()) or (
                kind == "mps" and not torch.backends.mps.is_available()):
            p.error(f"--device {args.device} is not available here (cpu, cuda, mps or auto)")


if __name__ == "__main__":
    main()
