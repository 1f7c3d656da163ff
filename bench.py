"""
Speed and memory of modernbert.py against Hugging Face transformers' ModernBertForMaskedLM, on the
same weights and the same inputs. The workloads are the paper's Table 2 shapes:

    short_fixed   every sequence 512 tokens
    short_var     lengths ~ Normal(256, 64), clipped to [16, 512]
    long_fixed    every sequence 8192 tokens
    long_var      lengths ~ Normal(4096, 1024), clipped to [16, 8192]
    train         one training step (forward, backward, AdamW) on short_var documents with 30% of
                  tokens masked: ours gets them packed, transformers padded with its own sparse
                  prediction switched on

Inference times the encoder (final hidden states, as for embeddings and retrieval); before any
timing both models must agree on the MLM logits of the very inputs that are timed.

    python bench.py                              # base width, 6 layers, every workload
    python bench.py --workloads short_var --no_memory      # one workload: a minute or two on a CPU
    python bench.py --layers 22 --device cuda --dtype bf16
    python bench.py --alternating --model mini --layers 4   # alternating vs all-global attention
    python bench.py --step_parts --model mini --layers 4 --vocab_size 8192 --threads 1
                                                  # train.py's phase-1 step, taken apart

On a 2-core CPU the full default run takes about a quarter of an hour (one thread), most of it
in the long workloads and the ten memory-probe processes.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modernbert import PRESETS, ModernBERT, config_for, cu_seqlens_of
from runtime import autocast_for, device_flag, matmul_flops, one_line_errors, pick_device

WORKLOADS = ["short_fixed", "short_var", "long_fixed", "long_var", "train"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=PRESETS, default="base",
                   help="modernbert.py's model preset (default: base)")
    p.add_argument("--layers", type=int, default=6,
                   help="depth (base has 22); 6 keeps 1 global in 3")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--short_batch", type=int, default=16, help="sequences per short batch")
    p.add_argument("--long_batch", type=int, default=2, help="sequences per long batch")
    p.add_argument("--train_batch", type=int, default=16, help="documents per training step")
    p.add_argument("--short_len", type=int, default=512)
    p.add_argument("--long_len", type=int, default=8192)
    p.add_argument("--device", type=device_flag, default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--dtype", default="auto",
                   help="auto (fp32 on CPU, bf16 on GPU), fp32, bf16 or fp16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alternating", action="store_true",
                   help="instead: ours with alternating attention against ours with every layer "
                        "global (the same weights), a training step on one row of each "
                        "--row_lengths, in turns")
    p.add_argument("--step_parts", action="store_true",
                   help="instead: a training step as train.py's phase 1 takes it (--train_batch "
                        "rows of --step_len tokens in micro-batches of 4), timed whole, then its "
                        "matmuls and its attention kernel's calls replayed alone (CPU)")
    p.add_argument("--step_len", type=int, default=256,
                   help="--step_parts' row length (default: phase 1's %(default)s)")
    p.add_argument("--vocab_size", type=int,
                   help="--alternating's and --step_parts' vocabulary (default: the preset's; "
                        "train.py's laptop model has prepare.py's 8192)")
    p.add_argument("--row_lengths", default="2048,4096,8192",
                   help="--alternating's rows, in tokens (default: phase 2's, %(default)s)")
    p.add_argument("--_memory_probe", nargs=3, metavar=("IMPL", "WORKLOAD", "DIR"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ["layers", "short_batch", "long_batch", "train_batch", "repeat", "threads",
                "vocab_size"]:
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key} must be at least 1, got {getattr(args, key)}")
    for key in ["short_len", "long_len", "step_len"]:  # lengths are drawn and clipped to [16, len]
        if getattr(args, key) < 16:
            p.error(f"--{key} must be at least 16, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0, got {args.warmup}")
    try:
        args.row_lengths = [int(n) for n in args.row_lengths.split(",")]
    except ValueError:
        p.error(f"--row_lengths must be comma-separated token counts, got {args.row_lengths!r}")
    if min(args.row_lengths) < 16:
        p.error(f"--row_lengths must be at least 16 tokens each, got {args.row_lengths}")
    return args


def pick_dtype(name, device):
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def fail(message):  # main turns it into the one line `bench.py: error: ...`
    raise ValueError(message)


# ----------------------------------------------------------------------------- inputs

def make_lengths(workload, args, g):
    max_len, batch = {"short": (args.short_len, args.short_batch),
                      "long": (args.long_len, args.long_batch),
                      "train": (args.short_len, args.train_batch)}[workload.split("_")[0]]
    if workload.endswith("fixed"):
        return [max_len] * batch
    mean = max_len / 2
    lengths = torch.normal(mean, mean / 4, (batch,), generator=g).round().clamp(16, max_len)
    return [int(n) for n in lengths]


def make_batch(workload, args, vocab_size, device):
    """A padded batch (ids, mask), the same for both models; for train also MLM labels."""
    g = torch.Generator().manual_seed(args.seed + WORKLOADS.index(workload))
    lengths = make_lengths(workload, args, g)
    T = max(lengths)
    ids = torch.randint(5, vocab_size, (len(lengths), T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    ids = ids.masked_fill(~mask, 0)
    labels = torch.where(mask & (torch.rand(ids.shape, generator=g) < 0.3), ids, -100)
    return ids.to(device), mask.to(device), labels.to(device)


# ----------------------------------------------------------------------------- the two models

def build_models(args, device, dtype, hf_dir, names=None):
    """Ours with random weights, saved once and loaded into transformers: identical weights.
    `names` picks a subset (the memory probe loads only the model it measures)."""
    from transformers import ModernBertForMaskedLM
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        torch.manual_seed(args.seed)
        config = config_for(args.model, n_layers=args.layers,
                            max_seq_len=max(args.long_len, args.short_len))
        ModernBERT(config).save_pretrained(hf_dir)
    names = names or ["ours", "hf_sdpa"] + (["hf_flash_attention_2"]
                                            if device.type == "cuda" and flash_available() else [])
    models = {}
    for name in names:
        if name == "ours":
            models[name] = ModernBERT.from_pretrained(hf_dir)
        else:  # transformers with its own sparse prediction on, so its training step is at its best
            impl = name.removeprefix("hf_")
            models[name] = ModernBertForMaskedLM.from_pretrained(hf_dir, attn_implementation=impl,
                                                                 sparse_prediction=True)
    return {name: m.to(device=device, dtype=dtype).eval() for name, m in models.items()}


def flash_available():  # the flash-attn package, which transformers' flash_attention_2 needs
    import modernbert
    return modernbert.flash_attn_varlen_func is not None


def inference_fn(name, model, ids, mask, labels):
    if name == "ours":
        return lambda: model.encode(ids, attention_mask=mask)
    return lambda: model.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def train_fn(name, model, ids, mask, labels):
    """One optimizer step. Ours: the same documents as one packed stream with cu_seqlens."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if name == "ours":
        stream, stream_labels = ids[mask], labels[mask]
        cu = cu_seqlens_of(mask.sum(-1))
        forward = lambda: model(stream, cu_seqlens=cu, labels=stream_labels)[1]
    else:
        forward = lambda: model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss

    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def check_same_logits(models, ids, mask, dtype):
    """A fast wrong answer does not count: every model must give the reference's MLM logits."""
    with torch.no_grad():
        ours, _ = models["ours"](ids, attention_mask=mask)
        scale = ours[mask].float().abs().max()
        for name, m in models.items():
            if name != "ours":
                theirs = m(input_ids=ids, attention_mask=mask.long()).logits
                diff = (ours - theirs)[mask].float().abs().max() / scale
                limit = 1e-4 if dtype == torch.float32 else 3e-2
                if not diff <= limit:
                    fail(f"{name} and ours disagree: max relative logit difference {diff:.2e}")


# ----------------------------------------------------------------------------- timing and memory

def time_median(fns, device, warmup, repeat, trains=False):
    """Median seconds of each function. The functions take turns, run by run, so that a change
    in the machine's load (other processes, clock boosts) hits every model alike."""
    times = {name: [] for name in fns}
    with torch.inference_mode(mode=not trains):
        for i in range(warmup + repeat):
            for name, fn in fns.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_mib(fn, device):
    """CUDA: max allocated during one run, over what was allocated before it. CPU: the growth of
    this process's peak resident memory (the kernel's high-water mark, reset just before) over its
    resident memory before the run. The probe process runs with a fixed mmap threshold and trims
    malloc first, so freed tensors go back to the system instead of hiding in malloc's caches."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if not os.path.exists("/proc/self/clear_refs"):
        return float("nan")  # not Linux: no resettable high-water mark
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - before) / 1024


def memory_probe(args):
    """Runs in a fresh process so that one measurement's caches cannot hide in another's peak."""
    impl, workload, hf_dir = args._memory_probe
    device = torch.device(pick_device(args.device))
    dtype = pick_dtype(args.dtype, device)
    model = build_models(args, device, dtype, hf_dir, names=[impl])[impl]
    ids, mask, labels = make_batch(workload, args, model.config.vocab_size, device)
    make = train_fn if workload == "train" else inference_fn
    fn = make(impl, model, ids, mask, labels)
    if workload == "train":
        fn()  # the first step creates the optimizer state: measure a steady-state step
        print(json.dumps(peak_memory_mib(fn, device)))
    else:
        with torch.inference_mode():
            fn()
            print(json.dumps(peak_memory_mib(fn, device)))


def measure_memory(args, impl, workload, hf_dir):
    argv = [sys.executable, __file__, "--_memory_probe", impl, workload, hf_dir]
    for key in ["model", "layers", "short_batch", "long_batch", "train_batch", "short_len",
                "long_len", "device", "dtype", "seed", "threads"]:
        if getattr(args, key) is not None:
            argv += [f"--{key}", str(getattr(args, key))]
    # big tensors: mmap'd, unmapped when freed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode:
        fail(f"memory probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    with one_line_errors("bench.py"):
        return run(args)


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_probe:
        return memory_probe(args)
    device = torch.device(pick_device(args.device))
    dtype = pick_dtype(args.dtype, device)
    if args.alternating:
        return alternating_against_global(args, device, dtype)
    if args.step_parts:
        return step_parts(args, device, dtype)
    workloads = args.workloads.split(",")
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        fail(f"unknown workload(s) {sorted(unknown)}; choose from {WORKLOADS}")
    hf_dir = tempfile.mkdtemp(prefix="bench_modernbert_")
    models = build_models(args, device, dtype, hf_dir)
    ours = models["ours"]
    print(f"device {device}, dtype {str(dtype).split('.')[-1]}, {args.model} width with "
          f"{args.layers} layers, our attention backend: {ours.attention_backend}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}",
          file=sys.stderr)
    peak = matmul_flops(dtype, device, n=2048)  # the fastest of repeated large matmuls
    results = []
    for workload in workloads:
        ids, mask, labels = make_batch(workload, args, ours.config.vocab_size, device)
        tokens = int(mask.sum())
        check_same_logits(models, ids, mask, dtype)
        row = {"workload": workload, "shape": list(ids.shape), "real_tokens": tokens,
               "padding": round(1 - tokens / ids.numel(), 3)}
        trains = workload == "train"
        make = train_fn if trains else inference_fn
        fns = {name: make(name, model, ids, mask, labels) for name, model in models.items()}
        seconds = time_median(fns, device, args.warmup, args.repeat, trains)
        for name, model in models.items():
            model.eval()
            row[f"{name}_tok_s"] = tokens / seconds[name]
            if not args.no_memory:
                row[f"{name}_mem_mib"] = measure_memory(args, name, workload, hf_dir)
            print(f"{workload:12s} {name:22s} {row[f'{name}_tok_s']:10.0f} tok/s", file=sys.stderr)
        row["speedup"] = row["ours_tok_s"] / row["hf_sdpa_tok_s"]
        if not args.no_memory:
            row["memory_ratio"] = row["ours_mem_mib"] / row["hf_sdpa_mem_mib"]
        if workload == "short_fixed":
            row["ours_tflops"] = row["ours_tok_s"] * \
                ours.flops_per_token(args.short_len, 0.0, training=False) / 1e12
            row["matmul_peak_tflops"] = peak / 1e12
        results.append(row)
    if args.json:
        print(json.dumps({"device": str(device), "dtype": str(dtype), "model": args.model,
                          "layers": args.layers, "results": results}, indent=2))
    else:
        print_table(results, models)


def alternating_and_global(config):
    """The same weights twice: with config's attention spans, and with every layer global."""
    models = {"alternating": ModernBERT(config),
              "all global": ModernBERT(replace(config, global_every=1))}
    models["all global"].load_state_dict(models["alternating"].state_dict())
    return models


def alternating_against_global(args, device, dtype):
    """What alternating attention buys in speed: one model with ModernBERT's layers (one global
    in three, a 128-token window in the others) and one with every layer global, both with the
    same weights (the span is not a weight), each taking a training step on the same row, in
    turns. A row is one document, 30% of it masked."""
    torch.manual_seed(args.seed)
    vocab = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    config = config_for(args.model, n_layers=args.layers, max_seq_len=max(args.row_lengths),
                        **vocab)
    models = {name: m.to(device=device, dtype=dtype)
              for name, m in alternating_and_global(config).items()}
    print(f"device {device}, dtype {str(dtype).split('.')[-1]}, {args.model} width with "
          f"{args.layers} layers ({sum(b.is_global for b in models['alternating'].layers)} of them "
          f"global when alternating, window {config.window}), vocabulary {config.vocab_size}, "
          f"attention backend {models['alternating'].attention_backend}, "
          f"threads {torch.get_num_threads()}",
          file=sys.stderr)
    print("| row length | alternating tok/s | all global tok/s | alternating / all global |")
    print("|---|---|---|---|")
    g = torch.Generator().manual_seed(args.seed)
    for length in args.row_lengths:
        ids = torch.randint(5, config.vocab_size, (1, length), generator=g).to(device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        labels = torch.where(torch.rand(ids.shape, generator=g).to(device) < 0.3, ids, -100)
        fns = {name: train_fn("ours", m, ids, mask, labels) for name, m in models.items()}
        seconds = time_median(fns, device, args.warmup, args.repeat, trains=True)
        print(f"| {length:,} | {length / seconds['alternating']:,.0f} | "
              f"{length / seconds['all global']:,.0f} | "
              f"{seconds['all global'] / seconds['alternating']:.2f}x |", flush=True)


# ------------------------------------------------------------------------- the step, taken apart

MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


class RecordCalls(TorchDispatchMode):
    """Records every matmul and attention-kernel call that runs under it: the op, and for each
    tensor argument its shape, strides and dtype (enough to call it again on fresh tensors)."""

    def __init__(self):
        super().__init__()
        self.matmuls, self.attention = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        specs = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
                 if isinstance(a, torch.Tensor) else a for a in args]  # shapes, no data
        if func in MATMULS:
            self.matmuls.append((func, specs))
        elif "scaled_dot_product" in func.name():  # SDPA's kernels, forward and backward
            self.attention.append((func, specs))
        return func(*args, **(kwargs or {}))


def matmul_flop(func, specs):
    """2 m k n for mm / addmm ((m, k) @ (k, n), addmm's bias first), times the batch for bmm."""
    a, b = specs[1:3] if func is torch.ops.aten.addmm.default else specs[:2]
    return 2 * a.numel() * b.shape[-1]


def fresh_arguments(specs):
    """Random CPU tensors in place of the recorded meta ones (same shapes, strides, dtypes)."""
    def fresh(spec):
        if not isinstance(spec, torch.Tensor):
            return spec
        t = torch.empty_strided(spec.shape, spec.stride(), dtype=spec.dtype)
        return t.normal_() if t.is_floating_point() else t.zero_()
    return [fresh(spec) for spec in specs]


def phase1_micro_batches(args, vocab_size):
    """--train_batch rows of --step_len random tokens, one document each, 30% masked, in
    micro-batches of 4 rows (train.py's default) as packed streams: [(ids, cu_seqlens, labels)]."""
    g = torch.Generator().manual_seed(args.seed)
    rows = torch.randint(5, vocab_size, (args.train_batch, args.step_len), generator=g)
    micro_batches = []
    for group in rows.split(4):
        ids = group.flatten()
        labels = torch.where(torch.rand(len(ids), generator=g) < 0.3, ids, -100)
        micro_batches.append((ids, cu_seqlens_of(torch.full((len(group),), args.step_len)), labels))
    return micro_batches


def step_parts(args, device, dtype):
    """How much of train.py's phase-1 step any change outside the matmuls could win. The step
    (AdamW; bf16 autocast for --dtype bf16, as train.py runs it on CPUs with bf16 units) is timed
    whole; then the matmuls it ran, and its attention kernel's calls, are replayed alone on fresh
    tensors of the same shapes, strides and dtypes, in turns with the step. Whole step - matmuls -
    attention is everything else: norms, GELU, RoPE, dropout, the loss's softmax, the optimizer,
    Python. Prints the table and returns the parts."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        fail("--step_parts replays CPU kernels in train.py's precisions: run it with --device cpu "
             "and --dtype fp32 or bf16")
    torch.manual_seed(args.seed)
    vocab = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    model = ModernBERT(config_for(args.model, n_layers=args.layers, **vocab)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    micro_batches = phase1_micro_batches(args, model.config.vocab_size)
    masked = sum(int((labels != -100).sum()) for *_, labels in micro_batches)
    print(f"{args.model} width with {args.layers} layers, vocabulary {model.config.vocab_size}, "
          f"{str(dtype).split('.')[-1]}, {args.train_batch} rows of {args.step_len} tokens "
          f"({masked:,} masked), threads {torch.get_num_threads()}; median of {args.repeat}",
          file=sys.stderr)

    def step():
        for ids, cu_seqlens, labels in micro_batches:
            with autocast_for(device, dtype == torch.bfloat16):
                _, loss = model(ids, cu_seqlens=cu_seqlens, labels=labels, reduction="sum")
            (loss / masked).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(max(args.warmup, 1)):
        step()
    with RecordCalls() as calls:
        step()
    replays = {part: [(func, fresh_arguments(specs)) for func, specs in recorded]
               for part, recorded in (("matmuls", calls.matmuls), ("attention", calls.attention))}

    def replay(part):
        return lambda: [func(*arguments) for func, arguments in replays[part]]
    parts = time_median({"step": step, "matmuls": replay("matmuls"),
                         "attention": replay("attention")}, device, 0, args.repeat, trains=True)
    parts.update(matmul_flop=sum(matmul_flop(func, specs) for func, specs in calls.matmuls),
                 n_matmuls=len(calls.matmuls), n_attention=len(calls.attention),
                 tokens=args.train_batch * args.step_len, masked=masked,
                 peak=matmul_flops(dtype, device, n=2048))
    print_step_parts(parts)
    return parts


def print_step_parts(p):
    step, matmuls, attention = p["step"], p["matmuls"], p["attention"]
    rest = step - matmuls - attention
    print(f"| part of the step ({p['tokens']:,} tokens) | ms | share of the step | GFLOP/s |")
    print("|---|---|---|---|")
    print(f"| the whole step | {step * 1e3:,.0f} | 100% | "
          f"{p['matmul_flop'] / step / 1e9:.1f} (its matmuls' FLOPs) |")
    print(f"| its {p['n_matmuls']} matmuls, replayed alone | {matmuls * 1e3:,.0f} | "
          f"{matmuls / step:.0%} | {p['matmul_flop'] / matmuls / 1e9:.1f} "
          f"({p['matmul_flop'] / matmuls / p['peak']:.0%} of the peak) |")
    print(f"| its {p['n_attention']} attention-kernel calls, replayed alone | "
          f"{attention * 1e3:,.0f} | {attention / step:.0%} | |")
    print(f"| everything else | {rest * 1e3:,.0f} | {rest / step:.0%} | |")
    print(f"\nmatmul peak (the fastest of repeated 2048^3 matmuls): {p['peak'] / 1e9:.1f} GFLOP/s. "
          f"With everything else free the step would run {step / (step - rest):.2f}x as fast; "
          f"as its matmuls alone, {step / matmuls:.2f}x.")


def print_table(results, models):
    names = [n for n in models]
    head = "| workload | tokens (padding) | " + " | ".join(f"{n} tok/s" for n in names) + \
        " | ours / hf_sdpa | memory ours / hf_sdpa (MiB) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        speeds = " | ".join(f"{r[f'{n}_tok_s']:,.0f}" for n in names)
        mem = (f"{r['ours_mem_mib']:,.0f} / {r['hf_sdpa_mem_mib']:,.0f} ({r['memory_ratio']:.2f}x)"
               if "memory_ratio" in r else "-")
        print(f"| {r['workload']} | {r['real_tokens']:,} ({r['padding']:.0%}) | {speeds} | "
              f"{r['speedup']:.2f}x | {mem} |")
    for r in results:
        if "ours_tflops" in r:
            print(f"\nshort_fixed: ours {r['ours_tflops'] * 1e3:.0f} GFLOP/s, a large matmul "
                  f"{r['matmul_peak_tflops'] * 1e3:.0f} GFLOP/s "
                  f"({r['ours_tflops'] / r['matmul_peak_tflops']:.0%} of it)")


if __name__ == "__main__":
    main()
