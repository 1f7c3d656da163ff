"""
What every script needs, on a floor below all of them, so that a fork can edit one script
without breaking another: the one-line error, the device and its speed, checkpoint files (atomic
writes, reads that cannot run code, the Hugging Face exports), the sequence-classification head
(classify.py's classifier, finetune.py's cross-encoder), a model loaded with its tokenizer, and
texts run through it packed, without padding.

    model, tokenizer, ids = load_model("out")             # newest out/phase*/ckpt.pt
    vectors = embed(model, tokenizer, texts, max_tokens=256)

Nothing here is part of the recipe (that is train.py) or of the model (modernbert.py). Functions
raise ValueError with the reason; only a script's main turns it into `script.py: error: ...`.
"""
import argparse
import glob
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
from tokenizers import Tokenizer
from tqdm import tqdm

import hf_format
from hf_format import hf_family
from modernbert import Config, ModernBERT, cu_seqlens_of

# ----------------------------------------------------------------------------- errors

@contextmanager
def one_line_errors(prog):
    """A script's main runs inside this: a ValueError (bad input, a file that is not what it
    should be) ends the process with the one line `prog: error: reason` and exit status 1."""
    try:
        yield
    except ValueError as e:
        raise SystemExit(f"{prog}: error: {e}") from None


# ----------------------------------------------------------------------------- the device

def pick_device(name="auto"):
    """"auto": CUDA, else Apple's MPS, else the CPU; any other name is used as it is."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def device_flag(text):
    """argparse type of every script's --device: auto, cpu, cuda, cuda:N or mps, if present."""
    kind = text.split(":")[0]
    present = {"auto": True, "cpu": True, "cuda": torch.cuda.is_available(),
               "mps": torch.backends.mps.is_available()}
    if not present.get(kind) or (":" in text and kind != "cuda"):
        raise argparse.ArgumentTypeError(f"{text} is not available here (cpu, cuda, mps or auto)")
    return text


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


def autocast_for(device, bf16):
    """A fresh bf16 autocast context for `device` (a string or torch.device), or none."""
    kind = str(device).split(":")[0]
    return torch.autocast(kind, dtype=torch.bfloat16) if bf16 else nullcontext()


# ----------------------------------------------------------------------------- checkpoint files

def save_atomic(path, state):
    """torch.save, atomically: a temporary file, flushed to disk, then renamed over the old one.
    An interrupt at any moment leaves either the old file or the new one, never a mix."""
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
            why = ("it holds Python objects beyond tensors and plain containers, which could "
                   "run code")
        elif "weights_only" in str(e):
            why = "not a file torch.save wrote"
        raise ValueError(f"{path!r} is not a model checkpoint, or is corrupted "
                         f"({type(e).__name__}: {why})")
    if not isinstance(ckpt, dict) or not {"config", "model"} <= ckpt.keys():
        raise ValueError(f"{path!r} is not a model checkpoint: no 'config' and 'model' entries")
    state = {}
    for name, tensor in ckpt["model"].items():
        while name.startswith(("_orig_mod.", "module.")):
            name = name.split(".", 1)[1]
        state[name] = tensor
    ckpt["model"] = state
    return ckpt


def export_hf(model, out_dir, tokenizer, pooling=None):
    """out_dir/hf, a directory that transformers loads as it is (the model, and its tokenizer
    with the special tokens AutoTokenizer and pipeline("fill-mask") need), written beside and
    then swapped in. With pooling ("mean" or "cls") it is a sentence-transformers model too,
    pooling as we trained. A model that mixes BERT's parts with ModernBERT's (an ablate.py rung)
    has no transformers class: none is written."""
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
        write_json(os.path.join(tmp, "tokenizer_config.json"), tokenizer_config(model.config))
    if pooling:
        for path, content in sentence_transformers_files(model.config, pooling).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, path)), exist_ok=True)
            write_json(os.path.join(tmp, path), content)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def mean_interval(values):
    """The 95% t interval of the mean of a few seeds' numbers."""
    from scipy import stats  # scipy comes with scikit-learn (requirements.txt)
    v = np.asarray(values, float)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return v.mean() - half, v.mean() + half


def write_json(path, content):
    with open(path, "w") as f:
        json.dump(content, f, indent=2)


def tokenizer_config(config):
    """transformers' tokenizer_config.json for our tokenizer.json: which tokens are special."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]",
            "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]",
            "unk_token": "[UNK]", "model_max_length": config.max_seq_len,
            "clean_up_tokenization_spaces": False}


def sentence_transformers_files(config, pooling):
    """A sentence-transformers model around the transformers one: the encoder (this directory),
    then pooling over every token ([CLS] and [SEP] included, as `pooled`), or the [CLS] state."""
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    modes = ["cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
             "weightedmean_tokens", "lasttoken"]
    chosen = {"mean": "mean_tokens", "cls": "cls_token"}[pooling]
    return {"modules.json": modules,
            "sentence_bert_config.json": {"max_seq_length": config.max_seq_len,
                                          "do_lower_case": False},
            "1_Pooling/config.json": {"word_embedding_dimension": config.d_model,
                                      **{f"pooling_mode_{m}": m == chosen for m in modes},
                                      "include_prompt": True},
            "config_sentence_transformers.json": {"similarity_fn_name": "cosine", "prompts": {},
                                                  "default_prompt_name": None}}


def setting_flags(parser, defaults, helps, choices=None, title="fine-tuning"):
    """finetune.py's and classify.py's settings as flags, each typed by its default and left None
    when not given (so --resume can tell a flag from the checkpoint's value)."""
    g = parser.add_argument_group(f"{title} (--resume keeps the checkpoint's)")
    for key, text in helps.items():
        g.add_argument(f"--{key}", type=type(defaults[key]), choices=(choices or {}).get(key),
                       help=f"{text} (default: {defaults[key]})")


def planned_run(args, defaults, source, out_dir, script):
    """(settings, resumed checkpoint or None) of a fine-tune of `source` into out_dir: the
    defaults with the flags given, or with --resume the checkpoint's own, which the flags may
    only repeat. finetune.py and classify.py share it."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    flags = {k: getattr(args, k) for k in defaults if getattr(args, k) is not None}
    if os.path.exists(ckpt_path) and not (args.resume or args.overwrite):
        raise ValueError(f"{ckpt_path} exists: continue it with --resume, or start over with "
                         "--overwrite")
    if not (args.resume and os.path.exists(ckpt_path)):
        return {**defaults, **flags}, None
    try:  # weights_only, one-line errors
        resumed = load_checkpoint(ckpt_path)
        settings, init_from = resumed["settings"], resumed["init_from"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot read {ckpt_path} (corrupted, or not a {script} checkpoint): "
                         f"{e}") from None
    for key, value in flags.items():
        if value != settings[key]:
            raise ValueError(f"--{key} {value} differs from {settings[key]} in {ckpt_path}: "
                             "--resume keeps its settings")
    if init_from != source:
        raise ValueError(f"{ckpt_path} fine-tunes {init_from}, not {source}: --resume continues "
                         "it from where it began")
    return settings, resumed


# ---------------------------------------------------------------------------- a classification head

class Classifier(nn.Module):
    """An encoder with a sequence-classification head, on packed sequences (no padding)."""

    def __init__(self, encoder, n_labels, pooling="cls", dropout=0.0):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.bert = hf_family_or_none(encoder.config) == "bert"
        d_model = encoder.config.d_model
        if self.bert:  # BERT: the pooler, tanh(dense(the [CLS] state)), fresh weights
            self.pooler = nn.Linear(d_model, d_model)
            nn.init.trunc_normal_(self.pooler.weight, std=encoder.config.init_std)
            nn.init.zeros_(self.pooler.bias)
        # ModernBERT: encoder.head (dense, GELU, norm), shared with the MLM head it starts from
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, n_labels)
        nn.init.trunc_normal_(self.classifier.weight, std=encoder.config.init_std)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, seqs):
        """(n_seqs, n_labels) logits of token-id sequences, one packed forward."""
        if self.bert:
            x = torch.tanh(self.pooler(pooled(self.encoder, seqs, "cls")))
        else:
            x = self.encoder.head(pooled(self.encoder, seqs, self.pooling))
        return self.classifier(self.drop(x))


def hf_family_or_none(config):
    try:
        return hf_format.hf_family(config)
    except ValueError:  # a mix of BERT's and ModernBERT's parts: ModernBERT's head, no export
        return None


def quiet_encoder(encoder):
    """No dropout inside the encoder: transformers' default for fine-tuning ModernBERT, and what
    makes the classifier's logits a function of its weights alone."""
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    encoder.config.attn_out_dropout = 0.0
    encoder.config.bert_dropout = False
    for block in encoder.layers:
        block.attn.probs_drop = 0.0
    return encoder


def export_classifier(model, out_dir, tokenizer_file, labels):
    """OUT/hf: a directory that ModernBertForSequenceClassification (or, for a BERT-mode model,
    BertForSequenceClassification) loads as it is, with num_labels, id2label and our logits."""
    encoder, family = model.encoder, hf_family_or_none(model.encoder.config)
    if family is None:
        tqdm.write(f"no {out_dir}/hf: transformers has no class for this mix of parts")
        return
    state = {n: t.detach().cpu().contiguous() for n, t in encoder.state_dict().items()
             if not n.startswith("decoder.")}
    tensors = {n: t for n, t in hf_format.tensors_to_hf(state, family).items()
               if not n.startswith("cls.")}  # BERT's MLM head goes; ModernBERT's `head` stays
    ours = dict(model.named_parameters())
    extra = ["pooler.weight", "pooler.bias"] if model.bert else []
    for name in extra + ["classifier.weight", "classifier.bias"]:
        theirs = "bert.pooler.dense." + name.split(".")[1] if name.startswith("pooler") else name
        tensors[theirs] = ours[name].detach().cpu().contiguous()
    config = hf_format.config_to_hf(encoder.config)
    config.update(architectures=[("Bert" if model.bert else "ModernBert")
                                 + "ForSequenceClassification"],
                  num_labels=len(labels), id2label=dict(enumerate(labels)),
                  label2id={label: i for i, label in enumerate(labels)},
                  classifier_pooling=model.pooling, classifier_dropout=model.drop.p)
    final, tmp = os.path.join(out_dir, "hf"), os.path.join(out_dir, "hf.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    safetensors.torch.save_file(tensors, os.path.join(tmp, "model.safetensors"),
                                metadata={"format": "pt"})
    write_json(os.path.join(tmp, "config.json"), config)
    shutil.copy(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
    write_json(os.path.join(tmp, "tokenizer_config.json"), tokenizer_config(encoder.config))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ----------------------------------------------------------------------------- a model to use

DEFAULT_RUN_DIR = "out"


def newest_checkpoint(run_dir):
    ckpts = glob.glob(os.path.join(run_dir, "phase*", "ckpt.pt"))
    if not ckpts:
        raise ValueError(f"no checkpoint in {run_dir}/phase*/ckpt.pt: run `python train.py "
                         "--phase 1` first, or pass --init_from")
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
    raise ValueError(f"{path!r} is not a model: expected a ckpt.pt, a directory holding one, or "
                     "a Hugging Face directory with config.json, model.safetensors and "
                     "tokenizer.json")


def model_tokenizer(path, vocab_size):
    """The tokenizer beside a model, checked against it: (tokenizer, ids of cls/sep/pad/mask)."""
    if not os.path.isfile(path):
        raise ValueError(f"no tokenizer.json beside the model: {path!r} is missing")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception for a broken file
        raise ValueError(f"cannot read tokenizer {path!r}: {e}")
    tokenizer.no_truncation()  # a tokenizer.json may carry its own truncation or padding settings
    tokenizer.no_padding()
    ids = {name: tokenizer.token_to_id(f"[{name.upper()}]")
           for name in ("cls", "sep", "pad", "mask")}
    if ids["cls"] is None or ids["sep"] is None:
        raise ValueError(f"tokenizer {path!r} has no [CLS] or [SEP] token, which every text "
                         "starts and ends with")
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if largest >= vocab_size:
        raise ValueError(f"tokenizer {path!r} has ids up to {largest}, but the model's vocabulary "
                         f"ends at {vocab_size - 1}: they do not belong together")
    return tokenizer, ids


def load_model(path=None, device=None):
    """(model, tokenizer, special ids) from our checkpoint or a Hugging Face directory; the ids
    ("cls", "sep", "pad", "mask") come from the tokenizer, "mask" is None if it has none."""
    path = find_model(path)
    if os.path.isdir(path):  # Hugging Face format
        try:
            model = ModernBERT.from_pretrained(path)
        except Exception as e:  # missing files, foreign configs and tensors: all "not a model"
            raise ValueError(f"{path!r} is not a ModernBERT model ({type(e).__name__}: {e})")
        tokenizer_path = os.path.join(path, "tokenizer.json")
    else:
        ckpt = load_checkpoint(path)  # tensors and plain containers only
        try:
            model = ModernBERT(Config(**ckpt["config"]))
            model.load_state_dict(ckpt["model"])
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"{path!r} does not fit this modernbert.py: {e}")
        tokenizer_path = os.path.join(os.path.dirname(path), "tokenizer.json")
    tokenizer, ids = model_tokenizer(tokenizer_path, model.config.vocab_size)
    return model.to(pick_device(device or "auto")).eval(), tokenizer, ids


# ----------------------------------------------------------------------------- texts through it

def encode(tokenizer, texts):
    """Token ids of each text as [CLS] ... [SEP], the layout the model was trained on."""
    for i, text in enumerate(texts, 1):
        if not text.strip():
            raise ValueError(f"text {i} is empty")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    seqs = [e.ids for e in tokenizer.encode_batch(texts)]
    # Our tokenizer and the released one both wrap a text; one without that post-processor does not.
    return [ids if ids[:1] == [cls] else [cls, *ids, sep] for ids in seqs]


def truncated(seqs, max_tokens, sep_id):
    """Each sequence cut to its first max_tokens tokens, the closing [SEP] kept."""
    return [ids if len(ids) <= max_tokens else ids[:max_tokens - 1] + [sep_id] for ids in seqs]


def token_budget_runs(lengths, max_tokens):
    """Indices of consecutive sequences, in runs of at most max_tokens tokens in all (a longer
    sequence goes alone): what one packed forward takes."""
    run, size = [], 0
    for i, n in enumerate(lengths):
        if run and size + n > max_tokens:
            yield run
            run, size = [], 0
        run.append(i)
        size += n
    if run:
        yield run


def packed_states(model, seqs):
    """(total_tokens, d_model) final hidden states of the sequences packed back to back, and
    their cu_seqlens: one forward, no padding, cu_seqlens keeps each sequence to itself."""
    device = model.tok_embeddings.weight.device
    tokens = torch.tensor([t for s in seqs for t in s], device=device)
    cu_seqlens = cu_seqlens_of([len(s) for s in seqs], device)
    return model.encode(tokens, cu_seqlens=cu_seqlens), cu_seqlens


def pooled(model, seqs, pool):
    """(n_seqs, d_model) float32 embeddings from one packed forward (with gradients, for
    fine-tuning): the mean of each sequence's final states over all its tokens, [CLS] and [SEP]
    included (sentence-transformers' mask-weighted mean, with no padding to mask), or its [CLS]."""
    states, cu_seqlens = packed_states(model, seqs)
    states = states.float()                                              # (total_tokens, d_model)
    if pool == "cls":
        return states[cu_seqlens[:-1].long()]
    lengths = cu_seqlens.diff()
    seq_ids = torch.repeat_interleave(torch.arange(len(seqs), device=states.device), lengths)
    sums = states.new_zeros(len(seqs), states.shape[1]).index_add_(0, seq_ids, states)
    return sums / lengths[:, None]


@torch.inference_mode()
def embed(model, tokenizer, texts, max_tokens, pool="mean", bf16=False, batch_tokens=8192,
          desc=None):
    """(n_texts, d_model) float32 embeddings of texts cut to max_tokens, on the CPU: `pooled`
    over runs of at most batch_tokens tokens. The one embedding path of every script."""
    seqs = truncated(encode(tokenizer, texts), max_tokens, tokenizer.token_to_id("[SEP]"))
    device = model.tok_embeddings.weight.device
    out = []
    with tqdm(total=len(seqs), desc=desc, unit="text", disable=desc is None, leave=False) as bar:
        for run in token_budget_runs([len(s) for s in seqs], batch_tokens):
            with autocast_for(device, bf16):
                out.append(pooled(model, [seqs[i] for i in run], pool))
            bar.update(len(run))
    return torch.cat(out).cpu()
