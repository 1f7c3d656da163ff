"""
ModernBERT in one file: the encoder of "Smarter, Better, Faster, Longer" (Warner et al., 2024,
arXiv 2412.13663), read top to bottom like the paper.

ModernBERT keeps BERT's job (a bidirectional encoder trained by masked language modelling) and
swaps almost every part for what decoder LLMs learned since 2018. Each change is marked where it
happens with "BERT:" (what it did) and "ModernBERT:" (what it does now, and why):
- unpadding: padding is removed once, at the start; every layer runs on real tokens only
- rotary position embeddings (RoPE) instead of learned absolute positions
- alternating attention: one layer in three global, the others a 128-token sliding window
- FlashAttention's variable-length kernel (else FlexAttention, or PyTorch SDPA) on the packed stream
- GeGLU instead of the GELU MLP; no biases in linear layers and norms; pre-norm blocks, and a
  LayerNorm after the last block
- sparse prediction: the MLM head runs only on the masked tokens
- Megatron-style init, with the residual output projections scaled down by depth

    model = ModernBERT(config_for("base"))
    logits, _ = model(input_ids, attention_mask=mask)            # (B, T, vocab)
    logits, loss = model(input_ids, attention_mask=mask, labels=labels)
    hidden = model.encode(input_ids, attention_mask=mask)         # (B, T, d_model)
    model = ModernBERT.from_pretrained("path/to/ModernBERT-base")  # a Hugging Face directory

Five switches in Config turn the changes to positions, MLP, biases, norm placement and attention
span back into BERT's, each at its "BERT:" comment; with all five, `config_for("bert-base")` is
BERT itself and `from_pretrained` loads transformers' BertForMaskedLM checkpoints (the
translation of names and config fields is in hf_format.py).
"""
import functools
import importlib.util
import inspect
import json
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import hf_format


# ----------------------------------------------------------------------------- configuration

POSITIONS = ("rope", "learned", "sinusoidal")  # Config.positions' values (train.py's choices)
MLPS = ("geglu", "gelu")                       # Config.mlp's


@dataclass
class Config:
    vocab_size: int = 50368    # a multiple of 64 so the embedding matmul tiles tensor cores evenly
    n_layers: int = 22
    d_model: int = 768
    n_heads: int = 12
    d_ff: int = 1152           # GeGLU width: the up-projection is 2 * d_ff wide
    window: int = 128          # local attention window, whole: a token sees +-window/2 neighbours
    global_every: int = 3      # layer i attends globally iff i % global_every == 0 (BERT: 1, all)
    global_theta: float = 160_000.0  # RoPE base of global layers (10k during phase 1 pretraining)
    local_theta: float = 10_000.0    # RoPE base of local layers
    max_seq_len: int = 8192
    norm_eps: float = 1e-5
    attn_out_dropout: float = 0.0    # pretraining uses 0.1, on the attention output only
    bert_dropout: bool = False       # True: BERT's, the same p also on embeddings, probs, MLP out
    init_std: float = 0.02
    pad_id: int = 50283        # special ids only travel to Hugging Face's config.json
    cls_id: int = 50281
    sep_id: int = 50282
    # BERT's parts, each switched back at its "BERT:" comment (the defaults are ModernBERT's):
    positions: str = "rope"    # or "learned": an absolute position table added to the embedding,
                               # or "sinusoidal": the same, fixed (Vaswani et al.), for the ladder
    mlp: str = "geglu"         # or "gelu": Linear -> GELU -> Linear, d_ff wide
    bias: bool = False         # True: a bias in every linear layer and LayerNorm
    prenorm: bool = True       # False: post-norm blocks, x = norm(x + f(x)), and no final norm

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def __post_init__(self):
        """A shape the model cannot have is refused here, with the reason, not in a reshape."""
        counts = ["vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "window", "global_every",
                  "max_seq_len"]
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.positions not in POSITIONS or self.mlp not in MLPS:
            raise ValueError(f"positions must be 'rope', 'learned' or 'sinusoidal' and mlp 'geglu' "
                             f"or 'gelu', got {self.positions!r}, {self.mlp!r}")
        if self.d_model % 2 and self.positions == "sinusoidal":
            raise ValueError(f"d_model {self.d_model} must be even: sinusoids come in sin, cos "
                             "pairs")
        if self.head_dim % 2 and self.positions == "rope":
            raise ValueError(f"head_dim d_model / n_heads = {self.head_dim} must be even: RoPE "
                             "rotates pairs")
        if self.window % 2:
            raise ValueError(f"window {self.window} must be even: a token sees window / 2 on "
                             "each side")
        if not 0 <= self.attn_out_dropout < 1:
            raise ValueError(f"attn_out_dropout must be in [0, 1), got {self.attn_out_dropout}")
        if min(self.global_theta, self.local_theta, self.norm_eps, self.init_std) <= 0:
            raise ValueError("global_theta, local_theta, norm_eps and init_std must be positive")


PRESETS = {
    "base": Config(),
    "large": Config(n_layers=28, d_model=1024, n_heads=16, d_ff=2624),
    # Laptop scale: the same architecture, narrow and shallow enough to train on a CPU.
    "small": Config(n_layers=6, d_model=256, n_heads=4, d_ff=512, max_seq_len=1024),
    "mini": Config(n_layers=4, d_model=256, n_heads=4, d_ff=512, max_seq_len=1024),  # the laptop's
    "tiny": Config(n_layers=3, d_model=64, n_heads=4, d_ff=96, window=16, max_seq_len=512),
}
# BERT (Devlin et al., 2018) in this code: every switch at BERT's, every layer global, eps 1e-12.
BERT = dict(positions="learned", mlp="gelu", bias=True, prenorm=False, global_every=1,
            norm_eps=1e-12)
PRESETS["bert-base"] = Config(vocab_size=30522, n_layers=12, d_model=768, n_heads=12, d_ff=3072,
                              max_seq_len=512, pad_id=0, cls_id=101, sep_id=102,
                              **BERT)  # bert-base-uncased's shape
# "mini" as BERT: d_ff 768 gives its GELU MLP the weights and FLOPs of mini's GeGLU
# (2 x 768 = 3 x 512).
PRESETS["bert-mini"] = replace(PRESETS["mini"], d_ff=768, **BERT)


def config_for(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------- unpadding
# BERT ran every layer on a padded (batch, max_len) rectangle, so a batch of one long and many
# short texts spent most of its FLOPs on padding. ModernBERT removes the padding once, at the
# start: all documents become one stream of real tokens, and `cu_seqlens` (cumulative lengths)
# says where each document starts. Embedding, norms, projections, MLP and head then run on
# (total_tokens, d_model); only attention needs to know about documents at all.

def cu_seqlens_of(lengths, device=None):
    """Document lengths -> cu_seqlens, the int32 start offsets [0, n0, n0 + n1, ..., total]."""
    lengths = torch.as_tensor(lengths, device=device)
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))              # (n_docs + 1,)


def unpad(input_ids, attention_mask=None, cu_seqlens=None):
    """Returns (tokens, cu_seqlens, indices); indices (None if already packed) puts tokens back."""
    if cu_seqlens is not None:  # a packed stream: (total_tokens,), documents back to back
        if input_ids.dim() != 1:
            raise ValueError("with cu_seqlens, input_ids must be a 1-D packed stream")
        return input_ids, cu_seqlens.to(torch.int32), None
    if input_ids.dim() != 2:
        raise ValueError("input_ids must be (batch, seq_len), or 1-D together with cu_seqlens")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=True)[0]     # (total_tokens,)
    return input_ids.flatten()[indices], cu_seqlens_of(attention_mask.sum(-1)), indices


def repad(x, indices, shape):
    """(total_tokens, ...) -> the caller's (B, T, ...) layout, zeros at padding."""
    if indices is None:
        return x
    out = x.new_zeros(shape.numel(), *x.shape[1:])
    out[indices] = x
    return out.view(*shape, *x.shape[1:])


class Documents:
    """What every layer's attention needs to know about the stream, computed once per forward:
    where each document starts and ends, each token's RoPE angles, and what the chosen attention
    kernel needs (see `attend`). Blocks and attention take (x, docs) and nothing else."""

    def __init__(self, cu_seqlens, config, backend):
        self.cu_seqlens = cu_seqlens                                        # (n_docs + 1,) int32
        self.backend = backend
        seqlens = cu_seqlens.diff()
        self.lengths = seqlens.tolist()
        self.max_seqlen = max(self.lengths, default=0)
        device = cu_seqlens.device
        self.doc_ids = torch.repeat_interleave(torch.arange(len(seqlens), device=device), seqlens)
        # Positions restart at 0 in every document, so a packed row is many independent texts.
        self.positions = torch.arange(int(cu_seqlens[-1]), device=device) - cu_seqlens[self.doc_ids]
        self.rope_global = rope_tables(self.positions, config.head_dim, config.global_theta)
        self.rope_local = rope_tables(self.positions, config.head_dim, config.local_theta)
        if backend == "sdpa":  # the CPU kernels' gathers and masks, shared by all layers
            self.length_groups = length_groups(self)
            # Documents no longer than twice the window take the global path's dense calls with a
            # band mask instead: at most 2 x window scores per query, 4/3 of the blocked path's
            # 3 x half window, but none of its pads, unfolds and per-block masks (faster on CPU).
            short = self.max_seqlen <= 2 * config.window
            self.local_mask = None if short else local_block_mask(self, config.window // 2)
            self.local_bands = [band_mask(n, config.window // 2, cu_seqlens.device)
                                for _, n in self.length_groups[2]] if short else None
        if backend == "flex":  # one block mask per kind of layer; the padding is a document too
            doc = F.pad(self.doc_ids, (0, -len(self.doc_ids) % FLEX_TILE), value=len(seqlens))
            self.flex_global = flex_block_mask(doc, None)
            self.flex_local = flex_block_mask(doc, config.window // 2)


# ----------------------------------------------------------------------------- rotary positions
# BERT: a learned absolute position embedding, added to the token embedding, that stops at 512.
# ModernBERT: rotary embeddings (RoPE) rotate each query and key by an angle proportional to its
# position, so q.k depends only on the distance between tokens. Nothing is learned, and a longer
# context only needs a larger base (theta): phase 2 raises the global layers' theta to 160k.

def rope_tables(positions, head_dim, theta):
    """(cos, signed_sin), each (total_tokens, head_dim): the angle of each token at each frequency,
    the sine's first half negated (see apply_rope)."""
    pairs = torch.arange(0, head_dim, 2, device=positions.device).float()
    inv_freq = 1.0 / theta ** (pairs / head_dim)
    angles = positions.float()[:, None] * inv_freq                     # (total_tokens, head_dim/2)
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)


def apply_rope(x, cos, signed_sin):
    """Rotates each pair (i, i + head_dim/2) of x: (total_tokens, ..., head_dim), in fp32. The
    usual form is x * cos + cat(-second_half, first_half) * sin; the half swap is a roll and the
    minus sign lives in the table, which makes it three elementwise ops."""
    x = x.float()
    cos, signed_sin = (t.view(len(t), *[1] * (x.dim() - 2), t.shape[-1]) for t in (cos, signed_sin))
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def sinusoids(positions, d_model, init_std):
    """(total_tokens, d_model): the original Transformer's fixed absolute positions (Vaswani et
    al. 2017), sin at even features and cos at odd ones, frequencies 1 / 10000^(2i / d_model). Not
    a ModernBERT part: the ablation's way to tell "absolute" from "learned from scratch". Scaled
    so a feature's RMS over a whole period is init_std, the token table's at init, where a
    learned table would start too."""
    pairs = torch.arange(0, d_model, 2, device=positions.device).float()
    inv_freq = 1.0 / 10_000 ** (pairs / d_model)
    angles = positions.float()[:, None] * inv_freq                      # (total_tokens, d_model/2)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # (total_tokens, d_model)
    return table * init_std * math.sqrt(2)


# ----------------------------------------------------------------------------- attention

class Attention(nn.Module):
    def __init__(self, config, is_global):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        # ModernBERT: alternating attention. Every third layer is global (sees the whole text);
        # the others are local, seeing only +-64 tokens. Long contexts then cost mostly O(n),
        # while the global layers still mix information across the whole document.
        self.half_window = None if is_global else config.window // 2
        self.rope = config.positions == "rope"
        self.Wqkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.Wo = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.out_drop = nn.Dropout(config.attn_out_dropout)
        # BERT: dropout on the attention probabilities too (ModernBERT: on the output only)
        self.probs_drop = config.attn_out_dropout if config.bert_dropout else 0.0

    def forward(self, x, docs):                                        # x: (total_tokens, d_model)
        qkv = self.Wqkv(x).view(len(x), 3, self.n_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=1)                                      # (total, heads, head_dim)
        if self.rope:  # BERT: no rotation, its positions were added to the embedding
            cos, sin = docs.rope_global if self.half_window is None else docs.rope_local
            q, k = apply_rope(qkv[:, :2], cos, sin).to(qkv.dtype).unbind(dim=1)
        out = attend(q, k, v, docs, self.half_window, self.probs_drop * self.training)
        return self.out_drop(self.Wo(out.reshape(len(x), -1)))


def attend(q, k, v, docs, half_window, dropout_p=0.0):
    """Each token attends to the tokens of its own document, in a local layer only to those at
    distance <= half_window. `attention_reference` says exactly that in a few lines; the kernels
    at the end of the file compute the same thing fast, and the tests hold each to the reference."""
    if dropout_p and docs.backend in ("torch-varlen", "flex"):  # kernels without dropout
        raise ValueError(f"BERT's dropout on attention probabilities has no {docs.backend} kernel: "
                         "set model.backend = 'sdpa'")
    if docs.backend == "flash-attn":
        return flash_attention(flash_attn_varlen_func, q, k, v, docs, half_window, dropout_p)
    if docs.backend == "torch-varlen":
        return flash_attention(varlen_attn, q, k, v, docs, half_window)
    if docs.backend == "flex":
        return flex(q, k, v, docs.flex_global if half_window is None else docs.flex_local)
    if docs.backend == "reference":
        return attention_reference(q, k, v, docs, half_window, dropout_p)
    if half_window is None:
        return sdpa_global(q, k, v, docs.length_groups, dropout_p)
    if docs.local_mask is None:
        return sdpa_global(q, k, v, docs.length_groups, dropout_p, docs.local_bands)
    return sdpa_local(q, k, v, docs.local_mask, half_window, dropout_p)


def attention_reference(q, k, v, docs, half_window, dropout_p=0.0):
    """The definition, dense: an (n, n) mask of same-document pairs, and in a local layer pairs
    at distance <= half_window. O(n^2) time and memory: for tests and for reading."""
    same_doc = docs.doc_ids[:, None] == docs.doc_ids[None, :]             # (n, n)
    if half_window is not None:
        i = torch.arange(len(q), device=q.device)
        same_doc &= (i[:, None] - i[None, :]).abs() <= half_window
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))                      # (heads, n, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=same_doc, dropout_p=dropout_p)
    return out.transpose(0, 1)


# ----------------------------------------------------------------------------- the other layers

def layer_norm(config):
    # BERT: LayerNorm with a bias. ModernBERT: no bias in any norm (or linear layer, below): the
    # biases bought nothing at scale, and dropping them frees parameters for the matmuls.
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    # BERT: Linear -> GELU -> Linear. ModernBERT: a gated linear unit (GeGLU), GELU(x W_in) *
    # (x W_gate), which trains to a lower loss for the same compute. Both halves come from one Wi.
    def __init__(self, config):
        super().__init__()
        self.gated = config.mlp == "geglu"
        width = (2 if self.gated else 1) * config.d_ff
        self.Wi = nn.Linear(config.d_model, width, bias=config.bias)
        self.Wo = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        # BERT: dropout on the MLP's output too; ModernBERT pretraining dropped nothing here.
        self.out_drop = (nn.Dropout(config.attn_out_dropout) if config.bert_dropout
                         else nn.Identity())

    def forward(self, x):
        if not self.gated:  # BERT
            return self.out_drop(self.Wo(F.gelu(self.Wi(x))))
        input, gate = self.Wi(x).chunk(2, dim=-1)                        # (total, d_ff) each
        return self.out_drop(self.Wo(F.gelu(input) * gate))


class Block(nn.Module):
    # BERT: post-norm, x = norm(x + f(x)). ModernBERT: pre-norm, x = x + f(norm(x)), which keeps
    # a clean residual path and trains stably without careful warmup. Layer 0 skips attn_norm:
    # the embedding output was normalised just before it.
    def __init__(self, config, index):
        super().__init__()
        self.is_global = index % config.global_every == 0
        self.prenorm = config.prenorm
        self.attn_norm = nn.Identity() if index == 0 and self.prenorm else layer_norm(config)
        self.attn = Attention(config, self.is_global)
        self.mlp_norm = layer_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, docs):
        if not self.prenorm:  # BERT: the same two norms, after each residual sum
            x = self.attn_norm(x + self.attn(x, docs))
            return self.mlp_norm(x + self.mlp(x))
        x = x + self.attn(self.attn_norm(x), docs)
        return x + self.mlp(self.mlp_norm(x))


class MLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.norm = layer_norm(config)

    def forward(self, x):
        return self.norm(F.gelu(self.dense(x)))


# ----------------------------------------------------------------------------- the model

class ModernBERT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # BERT: token + learned position + segment embeddings, then a LayerNorm. ModernBERT: tokens
        # only (RoPE carries position, and there is no next-sentence task), then the LayerNorm.
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":  # BERT (segments: every token has type 0, in this table)
            self.pos_embeddings = nn.Embedding(config.max_seq_len, config.d_model)
        self.embed_norm = layer_norm(config)
        self.embed_drop = (nn.Dropout(config.attn_out_dropout) if config.bert_dropout
                           else nn.Identity())
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        # Pre-norm blocks leave the last output unnormalised; BERT's post-norm ones end on a norm.
        self.final_norm = layer_norm(config) if config.prenorm else nn.Identity()
        self.head = MLMHead(config)
        self.decoder = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self.decoder.weight = self.tok_embeddings.weight  # tied: the output reuses the input table
        self.backend = "auto"  # or force one of BACKENDS; see attention_backend
        self.reset_parameters()

    BACKENDS = ("flash-attn", "torch-varlen", "flex", "sdpa", "reference")

    @property
    def attention_backend(self):
        """The kernel `attend` runs. On CUDA the fastest at hand (`cuda_backend`); on CPU and MPS
        "sdpa". "reference" (the dense definition, O(n^2)) runs only when asked for."""
        lacking = {"flash-attn": flash_attn_varlen_func is None, "flex": flex_attention is None,
                   "torch-varlen": not has_window(varlen_attn)}
        if self.backend not in ("auto", *self.BACKENDS) or lacking.get(self.backend):
            raise ValueError(f"attention backend {self.backend!r} is unknown or not installed "
                             "here; "
                             f"the choices: {', '.join(self.BACKENDS)}")
        if self.backend != "auto":
            return self.backend
        device = self.tok_embeddings.weight.device
        return cuda_backend(device) if device.type == "cuda" else "sdpa"

    def reset_parameters(self):
        # "Megatron" init: truncated normal (cut at 2 std) with std 0.02, and the two projections
        # that write into the residual stream (attention Wo, MLP Wo) scaled by 1/sqrt(2 n_layers)
        # so the residual's variance does not grow with depth. The head's dense layer keeps 0.02,
        # as in the official pretraining code (transformers' port scales it like Wo). Norm weights
        # start at one, every bias at zero.
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            else:
                s = out_std if name.endswith("Wo.weight") else std
                nn.init.trunc_normal_(p, std=s, a=-2 * s, b=2 * s)

    def encode_stream(self, tokens, cu_seqlens):
        """(total_tokens,) ids of documents back to back, and where each starts -> (total_tokens,
        d_model) final hidden states. The whole encoder; encode and forward only change layouts."""
        docs = Documents(cu_seqlens, self.config, self.attention_backend)
        x = self.tok_embeddings(tokens)                                  # (total_tokens, d_model)
        if self.config.positions == "learned":  # BERT: each token's position in its document
            x = x + self.pos_embeddings(docs.positions)
        if self.config.positions == "sinusoidal":  # absolute too, but nothing learned
            x = x + sinusoids(docs.positions, self.config.d_model, self.config.init_std)
        x = self.embed_drop(self.embed_norm(x))  # BERT: dropout here too
        for block in self.layers:
            x = block(x, docs)
        return self.final_norm(x)

    def encode(self, input_ids, attention_mask=None, cu_seqlens=None):
        """Final hidden states in the caller's layout: for embeddings and fine-tuning."""
        tokens, cu_seqlens, indices = unpad(input_ids, attention_mask, cu_seqlens)
        return repad(self.encode_stream(tokens, cu_seqlens), indices, input_ids.shape)

    def forward(self, input_ids, attention_mask=None, cu_seqlens=None, labels=None,
                reduction="mean"):
        """Padded (B, T) ids + mask, or a packed 1-D stream + cu_seqlens. Returns (logits, loss).
        Without labels: logits for every token, in the caller's layout, and loss None.
        With labels (-100 = not predicted): logits only for the labelled tokens, in stream order,
        and their cross-entropy ("mean", or "sum" for a trainer that divides by a global count)."""
        tokens, cu_seqlens, indices = unpad(input_ids, attention_mask, cu_seqlens)
        x = self.encode_stream(tokens, cu_seqlens)
        if labels is None:
            return repad(self.decoder(self.head(x)), indices, input_ids.shape), None
        # ModernBERT: sparse prediction. Only the ~30% masked tokens have a loss, so the head and
        # the vocabulary-sized decoder run on those rows alone (about 25% faster training).
        labels = labels.flatten() if indices is None else labels.flatten()[indices]
        picked = labels != -100
        logits = self.decoder(self.head(x[picked]))                      # (n_picked, vocab)
        return logits, F.cross_entropy(logits.float(), labels[picked], reduction=reduction)

    def flops_per_token(self, seq_len, predicted_fraction=1.0, training=True):
        """Matmul FLOPs per token, for MFU. A local layer attends to at most window + 1 keys."""
        c = self.config
        mlp = (3 if c.mlp == "geglu" else 2) * c.d_model * c.d_ff       # Wi (+ gate) and Wo
        matmuls = 2 * c.n_layers * (4 * c.d_model ** 2 + mlp)
        n_global = sum(block.is_global for block in self.layers)
        keys = n_global * seq_len + (c.n_layers - n_global) * min(seq_len, c.window + 1)
        attention = 4 * c.d_model * keys                                 # q.k and p.v, per key
        head = 2 * (c.d_model ** 2 + c.d_model * c.vocab_size) * predicted_fraction
        return (3 if training else 1) * (matmuls + attention + head)

    # ------------------------------------------------------------------------- Hugging Face format
    # transformers' tensor names and config.json fields, ModernBERT's and BERT's: hf_format.py.

    @classmethod
    def from_pretrained(cls, path):
        """Loads a Hugging Face ModernBERT or BERT directory (config.json + model.safetensors)."""
        with open(os.path.join(path, "config.json")) as f:
            model = cls(Config(**hf_format.config_from_hf(json.load(f))))
        hf_tensors = load_file(os.path.join(path, "model.safetensors"))
        ours = hf_format.tensors_from_hf(hf_tensors, hf_format.hf_family(model.config))
        model.load_state_dict(hf_format.checked(ours, model.state_dict()), strict=False)
        return model

    def save_pretrained(self, path):
        """Writes a directory that transformers' ModernBertForMaskedLM loads, or its BertForMaskedLM
        for a model with every switch at BERT's."""
        state = {n: t.detach().cpu().contiguous() for n, t in self.state_dict().items()
                 if n != "decoder.weight"}
        tensors = hf_format.tensors_to_hf(state, hf_format.hf_family(self.config))
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_format.config_to_hf(self.config), f, indent=2)


# ----------------------------------------------------------------------------- the fast kernels
# Everything above says *what* the model computes; this section is *how* attention runs fast on
# each device. `attention_reference` is the definition, and the tests hold every kernel here to
# it (and to transformers).
# BERT: dense attention over the padded rectangle, with a mask to hide the padding. ModernBERT:
# FlashAttention's variable-length kernel on the unpadded stream, where cu_seqlens keeps every
# document to itself and the sliding window costs nothing extra. CUDA runs the fastest kernel at
# hand (`cuda_backend`); CPU and MPS run the SDPA path, still unpadded and O(n * window) in local
# layers. Each kernel maps q, k, v of shape (total_tokens, n_heads, head_dim) to an output of that
# shape.

# The CUDA attention kernels, all optional (see `attend`); a build that does not load is absent.
try:  # the flash-attn package (FlashAttention 2)
    from flash_attn import flash_attn_varlen_func
except Exception:
    flash_attn_varlen_func = None
try:  # PyTorch's own varlen FlashAttention: torch 2.10+, with the sliding window from 2.11
    from torch.nn.attention.varlen import varlen_attn
except Exception:
    varlen_attn = None
try:  # FlexAttention: torch 2.5+; fast only when torch.compile turns it into a Triton kernel
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except Exception:
    BlockMask = flex_attention = None
HAS_TRITON = importlib.util.find_spec("triton") is not None

def flash_attention(kernel, q, k, v, docs, half_window, dropout_p=0.0):
    """Either varlen FlashAttention (flash-attn's flash_attn_varlen_func or torch's varlen_attn,
    same arguments): it reads cu_seqlens (int32) and the longest length (a Python int) directly,
    no padding, no mask tensor. Key j is visible from query i iff i - left <= j <= i + right."""
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16  # 16-bit only
    window = (-1, -1) if half_window is None else (half_window, half_window)  # -1: no limit
    cu, longest = docs.cu_seqlens, docs.max_seqlen
    dropout = {"dropout_p": dropout_p} if dropout_p else {}  # flash-attn's only: torch's has none
    out = kernel(q.to(dtype), k.to(dtype), v.to(dtype), cu, cu, longest, longest,
                 window_size=window, **dropout)
    return out.to(q.dtype)


FLEX_TILE = 128  # FlexAttention works in 128 x 128 tiles of (query, key): skipped, masked or full


def flex_block_mask(doc, half_window):
    """FlexAttention's BlockMask for sorted document ids `doc` (padded to whole tiles), made from
    each tile's first and last id, never an (n, n) tensor. Tile pairs that share no document or
    lie beyond the window are skipped; "full" ones (one document, all in the window) skip
    mask_mod."""
    first, last = doc.view(-1, FLEX_TILE)[:, 0], doc.view(-1, FLEX_TILE)[:, -1]   # (n_tiles,)
    some_same = (first[:, None] <= last[None, :]) & (last[:, None] >= first[None, :])
    all_same = (first[:, None] == last[None, :]) & (last[:, None] == first[None, :])  # ids sorted
    some_near = all_near = True
    mask_mod = lambda b, h, i, j: doc[i] == doc[j]
    if half_window is not None:
        mask_mod = lambda b, h, i, j: (doc[i] == doc[j]) & ((i - j).abs() <= half_window)
        tile = torch.arange(len(first), device=doc.device)
        gap = (tile[:, None] - tile[None, :]).abs() * FLEX_TILE     # (n_tiles, n_tiles) in tokens
        some_near = gap - (FLEX_TILE - 1) <= half_window              # the closest pair
        all_near = gap + (FLEX_TILE - 1) <= half_window               # the farthest pair
    full = all_same & all_near
    partial = some_same & some_near & ~full
    return BlockMask.from_kv_blocks(*kv_tile_lists(partial), *kv_tile_lists(full),
                                    BLOCK_SIZE=FLEX_TILE,
                                    mask_mod=mask_mod)


def kv_tile_lists(tiles):
    """(n_tiles, n_tiles) bool -> per query tile, the count and the indices of its key tiles."""
    order = tiles.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
    return tiles.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]


@functools.cache
def compiled_flex_attention():  # a fused Triton kernel; uncompiled, flex makes every score
    return torch.compile(flex_attention)


def flex(q, k, v, block_mask):
    """One FlexAttention call for the whole stream, as a batch of one padded to whole tiles."""
    n, pad = len(q), block_mask.shape[-2] - len(q)  # the mask's length: n_tiles * FLEX_TILE
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)).transpose(0, 1)[None] for t in (q, k, v))
    attention = compiled_flex_attention() if q.is_cuda else flex_attention  # CPU: tests only
    out = attention(q, k, v, block_mask=block_mask)                # (1, heads, n_padded, head_dim)
    return out[0].transpose(0, 1)[:n]


def has_window(kernel):
    # torch 2.10's varlen_attn has no window_size, and ModernBERT's local layers need it.
    return kernel is not None and "window_size" in inspect.signature(kernel).parameters


def cuda_backend(device):
    """The fastest kernel this GPU and this install have: both FlashAttentions need an Ampere or
    newer GPU, FlexAttention needs Triton (not on Windows), which needs Volta or newer."""
    capability = torch.cuda.get_device_capability(device)
    if capability >= (8, 0) and flash_attn_varlen_func is not None:
        return "flash-attn"
    if capability >= (8, 0) and has_window(varlen_attn):
        return "torch-varlen"
    return "flex" if capability >= (7, 0) and flex_attention is not None and HAS_TRITON else "sdpa"


def length_groups(docs):
    """For the global SDPA path: documents of equal length, side by side, share one SDPA call with
    nothing padded or masked. Returns the token order that puts them side by side (None when the
    stream already is), its inverse, and (n_docs, length) for each run of equal lengths."""
    by_length = {}
    for i, n in enumerate(docs.lengths):
        if n > 0:
            by_length.setdefault(n, []).append(i)
    runs = [(len(ids), n) for n, ids in by_length.items()]
    doc_order = [i for ids in by_length.values() for i in ids]
    if doc_order == sorted(doc_order):
        return None, None, runs
    starts = docs.cu_seqlens[:-1].long()
    order = torch.cat([(starts[ids][:, None] + torch.arange(n, device=starts.device)).flatten()
                       for n, ids in by_length.items()])
    return order, torch.argsort(order), runs


def band_mask(length, half_window, device):
    """(length, length): |i - j| <= half_window, a local layer's mask within one document."""
    i = torch.arange(length, device=device)
    return (i[:, None] - i[None, :]).abs() <= half_window


def sdpa_global(q, k, v, groups, dropout_p=0.0, masks=None):
    """Each run of equal-length documents in one SDPA call; masks: one per run (a local layer's
    band masks), or None for global attention."""
    order, inverse, runs = groups
    if order is not None:
        q, k, v = q[order], k[order], v[order]
    sizes = [n_docs * length for n_docs, length in runs]
    outs = []
    masks = masks or [None] * len(runs)
    for (n_docs, length), mask, qg, kg, vg in zip(runs, masks, q.split(sizes), k.split(sizes),
                                                  v.split(sizes)):
        qg, kg, vg = (t.unflatten(0, (n_docs, length)).transpose(1, 2) for t in (qg, kg, vg))
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout_p)
        outs.append(out.transpose(1, 2).flatten(0, 1))
    out = torch.cat(outs)                                                # (total, heads, head_dim)
    return out if order is None else out[inverse]


def local_block_mask(docs, half_window):
    """(n_blocks, 1, w, 3w) for the blocked local path: same document and |i - j| <= w."""
    w = half_window
    n = len(docs.doc_ids)
    n_blocks = -(-n // w)
    query_doc = F.pad(docs.doc_ids, (0, n_blocks * w - n), value=-1).view(n_blocks, w)
    key_doc = F.pad(docs.doc_ids, (w, n_blocks * w - n + w), value=-1).unfold(0, 3 * w, w)
    query_pos = torch.arange(n_blocks * w, device=docs.doc_ids.device).view(n_blocks, w)
    key_pos = torch.arange(-w, (n_blocks + 1) * w, device=query_pos.device).unfold(0, 3 * w, w)
    near = (query_pos[:, :, None] - key_pos[:, None, :]).abs() <= w
    return (near & (query_doc[:, :, None] == key_doc[:, None, :]))[:, None]


def sdpa_local(q, k, v, block_mask, half_window, dropout_p=0.0):
    """Sliding-window attention in O(n * window): queries go in blocks of w = half_window, and
    block b only looks at key blocks b-1, b, b+1, which hold every key within distance w.
    Padding slots carry document id -1, so a padded query sees only padding and never NaNs."""
    w = half_window
    n, heads, hd = q.shape
    n_blocks = block_mask.shape[0]
    pad = n_blocks * w - n
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(n_blocks, w, heads, hd).transpose(1, 2)

    def neighbourhood(t):  # (n, heads, hd) -> (n_blocks, heads, 3w, hd), overlapping windows
        return F.pad(t, (0, 0, 0, 0, w, pad + w)).unfold(0, 3 * w, w).permute(0, 1, 3, 2)

    out = F.scaled_dot_product_attention(qb, neighbourhood(k), neighbourhood(v),
                                         attn_mask=block_mask,
                                         dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(n_blocks * w, heads, hd)[:n]
