"""
Hugging Face's checkpoint format for modernbert.py, both ways: transformers' tensor names and
config.json fields for ModernBertForMaskedLM and, for a model with every BERT switch on,
BertForMaskedLM. `ModernBERT.from_pretrained` and `save_pretrained` call these; nothing here is
part of the model, and nothing here imports it: configs come in as any object with Config's
fields and go out as a dict of them.
"""
import re

import torch

# The Config switches (modernbert.py) of each transformers family; a mix of the two has no class.
FAMILY_PARTS = {"modernbert": dict(positions="rope", mlp="geglu", bias=False, prenorm=True),
                "bert": dict(positions="learned", mlp="gelu", bias=True, prenorm=False,
                             global_every=1)}


def hf_family(c):
    """The transformers model with this config's parts: "modernbert" or "bert" (a mix has none)."""
    for family, parts in FAMILY_PARTS.items():
        if all(getattr(c, key) == value for key, value in parts.items()):
            return family
    raise ValueError("transformers has no model for this config: it mixes BERT's parts and "
                     "ModernBERT's, or has the ladder's sinusoidal positions")


# ----------------------------------------------------------------------------- tensors

# transformers' names for ours: (our prefix, theirs) pairs, the first that fits wins; {} is the
# layer. "qkv" stands for our fused Wqkv, which BERT keeps as three Linear layers: query, key and
# value.
BERT_LAYER = "bert.encoder.layer.{}."
HF_NAMES = {
    "modernbert": [("tok_embeddings.", "model.embeddings.tok_embeddings."),
                   ("layers.", "model.layers."),
                   ("embed_norm.", "model.embeddings.norm."),
                   ("final_norm.", "model.final_norm."),
                   ("head.", "head."),
                   ("decoder.", "decoder.")],
    "bert": [("tok_embeddings.", "bert.embeddings.word_embeddings."),
             ("pos_embeddings.", "bert.embeddings.position_embeddings."),
             ("embed_norm.", "bert.embeddings.LayerNorm."),
             ("layers.{}.attn.Wqkv.", BERT_LAYER + "attention.self.qkv."),
             ("layers.{}.attn.Wo.", BERT_LAYER + "attention.output.dense."),
             ("layers.{}.attn_norm.", BERT_LAYER + "attention.output.LayerNorm."),
             ("layers.{}.mlp.Wi.", BERT_LAYER + "intermediate.dense."),
             ("layers.{}.mlp.Wo.", BERT_LAYER + "output.dense."),
             ("layers.{}.mlp_norm.", BERT_LAYER + "output.LayerNorm."),
             ("head.dense.", "cls.predictions.transform.dense."),
             ("head.norm.", "cls.predictions.transform.LayerNorm."),
             ("decoder.bias", "cls.predictions.bias")],
}


def renamed(name, pairs):
    key = re.sub(r"\.\d+\.", ".{}.", name, count=1)
    for old, new in pairs:
        if key.startswith(old):
            return (new + key[len(old):]).format(*re.findall(r"\.(\d+)\.", name)[:1])
    raise ValueError(f"unexpected tensor {name!r} in the checkpoint")


def tensors_to_hf(state, family):
    """Our tensors under transformers' names. For BERT, Wqkv split in three, and a segment table of
    one row of zeros: the type every token has, whose embedding our position table already holds."""
    hf = {renamed(name, HF_NAMES[family]): t for name, t in state.items()}
    for name in [n for n in hf if ".qkv." in n]:  # q, k, v: contiguous row blocks of Wqkv
        q_k_v = hf.pop(name).chunk(3)
        hf.update({name.replace("qkv", p): t for p, t in zip(["query", "key", "value"], q_k_v)})
    if family == "bert":
        zeros = torch.zeros_like(hf["bert.embeddings.LayerNorm.bias"])
        hf["bert.embeddings.token_type_embeddings.weight"] = zeros[None]
    return hf


def tensors_from_hf(hf, family):
    """The reverse. From BERT: segment type 0 (every token's) added to each position's row; query,
    key and value fused; the pooler, next-sentence head and the decoder's tied copies left out."""
    unused = ("bert.pooler.", "cls.seq_relationship.", "cls.predictions.decoder.")
    plain = lambda n: (n.replace("LayerNorm.gamma", "LayerNorm.weight")   # old exports' names
                       .replace("LayerNorm.beta", "LayerNorm.bias"))
    hf = {plain(n): t for n, t in hf.items() if not n.startswith(unused)}
    segments = hf.pop("bert.embeddings.token_type_embeddings.weight", None)
    if segments is not None:
        positions = "bert.embeddings.position_embeddings.weight"
        hf[positions] = hf[positions] + segments[0]
    for name in [n for n in hf if ".self.query." in n]:
        parts = [hf.pop(name.replace("query", p)) for p in ("query", "key", "value")]
        hf[name.replace("query", "qkv")] = torch.cat(parts)
    reverse = [(new, old) for old, new in HF_NAMES[family]]
    return {renamed(name, reverse): t for name, t in hf.items()}


def checked(ours, expected):
    """`ours` (renamed tensors) if they are exactly the model's `expected` state: the same names,
    each of the same shape. The decoder's weight is the embedding's (tied); a checkpoint that
    stores a copy must store an equal one. Else ValueError naming what differs."""
    tied = ours.pop("decoder.weight", None)  # older exports store the tied copy too
    expected = {name: t for name, t in expected.items() if name != "decoder.weight"}
    missing, unexpected = expected.keys() - ours.keys(), ours.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    for name, t in ours.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{name}: checkpoint {tuple(t.shape)} vs model "
                             f"{tuple(expected[name].shape)}")
    if tied is not None and not torch.equal(tied, ours["tok_embeddings.weight"]):
        raise ValueError("decoder.weight is not tied to tok_embeddings.weight")
    return ours


# ----------------------------------------------------------------------------- config.json

def config_from_hf(hf):
    """Config's fields (a dict) for a transformers config.json."""
    bert = hf.get("model_type") == "bert"
    wants = ([("hidden_act", "gelu"), ("position_embedding_type", "absolute"),
              ("is_decoder", False)] if bert else
             [("attention_bias", False), ("mlp_bias", False), ("norm_bias", False),
              ("decoder_bias", True), ("hidden_activation", "gelu"),
              ("classifier_activation", "gelu")])
    for key, want in wants + [("tie_word_embeddings", True)]:
        if hf.get(key, want) != want:
            raise ValueError(f"unsupported checkpoint: {key}={hf[key]!r} "
                             f"(this implementation needs {want!r})")
    if bert:
        return dict(**FAMILY_PARTS["bert"], vocab_size=hf["vocab_size"],
                    n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
                    n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
                    max_seq_len=hf.get("max_position_embeddings", 512),
                    norm_eps=hf.get("layer_norm_eps", 1e-12),
                    init_std=hf.get("initializer_range", 0.02),
                    pad_id=hf.get("pad_token_id", 0), cls_id=hf.get("cls_token_id", 101),
                    sep_id=hf.get("sep_token_id", 102))
    n_layers = hf["num_hidden_layers"]
    global_every = hf.get("global_attn_every_n_layers", 3)
    if hf.get("layer_types"):  # newer transformers spell the pattern out per layer
        global_every = next((i for i, t in enumerate(hf["layer_types"])
                             if i and t == "full_attention"), n_layers)
        want = ["sliding_attention" if i % global_every else "full_attention"
                for i in range(n_layers)]
        if hf["layer_types"] != want:
            raise ValueError(f"unsupported layer_types pattern {hf['layer_types']}")
    rope = hf.get("rope_parameters") or {}
    global_theta = rope.get("full_attention", {}).get("rope_theta",
                                                      hf.get("global_rope_theta", 160_000.0))
    local_theta = rope.get("sliding_attention", {}).get("rope_theta",
                                                        hf.get("local_rope_theta")) or global_theta
    return dict(**FAMILY_PARTS["modernbert"], vocab_size=hf["vocab_size"], n_layers=n_layers,
                d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
                d_ff=hf["intermediate_size"], window=hf.get("local_attention", 128),
                global_every=global_every, global_theta=float(global_theta),
                local_theta=float(local_theta), max_seq_len=hf.get("max_position_embeddings", 8192),
                norm_eps=hf.get("norm_eps", 1e-5), init_std=hf.get("initializer_range", 0.02),
                pad_id=hf.get("pad_token_id", 50283), cls_id=hf.get("cls_token_id", 50281),
                sep_id=hf.get("sep_token_id", 50282))


def config_to_hf(c):
    if hf_family(c) == "bert":  # BertConfig's fields; cls and sep ids (not among them) ride along
        return {"architectures": ["BertForMaskedLM"], "model_type": "bert",
                "vocab_size": c.vocab_size, "hidden_size": c.d_model,
                "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
                "intermediate_size": c.d_ff, "hidden_act": "gelu",
                "max_position_embeddings": c.max_seq_len, "type_vocab_size": 1,
                "layer_norm_eps": c.norm_eps, "initializer_range": c.init_std,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,  # why: see below
                "tie_word_embeddings": True, "pad_token_id": c.pad_id, "cls_token_id": c.cls_id,
                "sep_token_id": c.sep_id, "torch_dtype": "float32"}
    # The field names of the released answerdotai/ModernBERT-base config.json, which every
    # transformers version since ModernBERT's release reads.
    return {"architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert",
            "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "intermediate_size": c.d_ff,
            "hidden_activation": "gelu", "max_position_embeddings": c.max_seq_len,
            "local_attention": c.window, "global_attn_every_n_layers": c.global_every,
            "global_rope_theta": c.global_theta, "local_rope_theta": c.local_theta,
            "norm_eps": c.norm_eps, "norm_bias": False, "attention_bias": False, "mlp_bias": False,
            "decoder_bias": True, "classifier_activation": "gelu",
            # 0.0, as in the released models: transformers would apply attention_dropout to the
            # attention probabilities too, which pretraining never did (it dropped the output only).
            "attention_dropout": 0.0, "embedding_dropout": 0.0, "mlp_dropout": 0.0,
            "initializer_range": c.init_std, "initializer_cutoff_factor": 2.0,
            "tie_word_embeddings": True, "pad_token_id": c.pad_id, "cls_token_id": c.cls_id,
            "sep_token_id": c.sep_id, "bos_token_id": c.cls_id, "eos_token_id": c.sep_id,
            "torch_dtype": "float32"}
