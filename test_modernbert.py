"""Tests of modernbert.py against independent references: Hugging Face transformers' ModernBERT
(its sdpa implementation), brute-force recomputation, and hand-worked counts. CPU, fp32. The CUDA
kernels' glue runs on CPU against fakes that follow each kernel's documented contract; the tests
of the real kernels skip without CUDA."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import hf_format
import modernbert
from modernbert import Config, Documents, ModernBERT, config_for

transformers = pytest.importorskip("transformers")

SPECIAL = dict(pad_id=0, cls_id=1, sep_id=2)
# Three shapes that differ in depth, width, heads, window and the global/local pattern.
CONFIGS = {
    "narrow": Config(vocab_size=320, n_layers=4, d_model=64, n_heads=4, d_ff=96, window=16,
                     global_every=3, global_theta=160_000.0, local_theta=10_000.0,
                     max_seq_len=512, **SPECIAL),
    "wide_heads": Config(vocab_size=256, n_layers=5, d_model=96, n_heads=3, d_ff=160, window=32,
                         global_every=2, global_theta=10_000.0, local_theta=10_000.0,
                         max_seq_len=512, **SPECIAL),
    "one_global": Config(vocab_size=192, n_layers=4, d_model=128, n_heads=8, d_ff=64, window=8,
                         global_every=4, global_theta=50_000.0, local_theta=2_000.0,
                         max_seq_len=512, **SPECIAL),
}

# FlexAttention (torch 2.5+) runs unfused on CPU, the tests' only use of it, and warns so.
needs_flex = pytest.mark.skipif(modernbert.flex_attention is None, reason="needs FlexAttention")
no_compile_warning = pytest.mark.filterwarnings("ignore:flex_attention called without "
                                                "torch.compile")


def seeded(config, seed=0):
    """A model whose every parameter, norms and decoder bias included, is random (init makes norms
    exactly one, which would hide a norm that is skipped or misplaced)."""
    torch.manual_seed(seed)
    model = ModernBERT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name
                        else 0.1 * torch.randn_like(p))
    return model


def padded_batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def lengths_for(config):
    w = config.window
    # 1, a multiple of 32, below / at / just past the half window and the window, and far above it.
    return [1, 64, w // 2 - 1, w // 2, w // 2 + 1, w, w + 1, 7 * w + 5]


def hf_logits(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask.long()).logits


# ------------------------------------------------------------------------- parity with transformers

def test_parameter_counts_match_transformers():
    for name, expected in [("base", 149_655_232), ("large", 395_881_664)]:
        with torch.device("meta"):  # shapes only: no memory, no init time
            ours = ModernBERT(config_for(name))
        c = ours.config
        hf_config = transformers.ModernBertConfig(vocab_size=c.vocab_size, hidden_size=c.d_model,
                                                  num_hidden_layers=c.n_layers,
                                                  num_attention_heads=c.n_heads,
                                                  intermediate_size=c.d_ff)
        with torch.device("meta"):
            hf = transformers.ModernBertForMaskedLM(hf_config)
        assert sum(p.numel() for p in ours.parameters()) == expected
        assert sum(p.numel() for p in hf.parameters()) == expected


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_saved_loads_in_transformers_with_same_logits(name, tmp_path):
    config = CONFIGS[name]
    ours = seeded(config)
    ours.save_pretrained(tmp_path)
    hf, info = transformers.ModernBertForMaskedLM.from_pretrained(tmp_path,
                                                                  attn_implementation="sdpa",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask = padded_batch(lengths_for(config), config.vocab_size)
    with torch.no_grad():
        logits, _ = ours(ids, attention_mask=mask)
    assert (logits - hf_logits(hf.eval(), ids, mask))[mask].abs().max() <= 1e-4
    assert logits[~mask].abs().max() == 0  # padding comes back as zeros


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_checkpoint_loads_with_same_logits(name, tmp_path):
    c = CONFIGS[name]
    hf_config = transformers.ModernBertConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, intermediate_size=c.d_ff, local_attention=c.window,
        global_attn_every_n_layers=c.global_every, global_rope_theta=c.global_theta,
        local_rope_theta=c.local_theta, pad_token_id=0, bos_token_id=1, cls_token_id=1,
        eos_token_id=2, sep_token_id=2, max_position_embeddings=c.max_seq_len)
    torch.manual_seed(1)
    hf = transformers.ModernBertForMaskedLM(hf_config).eval()
    with torch.no_grad():  # random norms and decoder bias here too
        for name_, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = ModernBERT.from_pretrained(tmp_path).eval()
    assert ours.config == c
    ids, mask = padded_batch(lengths_for(c), c.vocab_size, seed=1)
    with torch.no_grad():
        logits, _ = ours(ids, attention_mask=mask)
    assert (logits - hf_logits(hf, ids, mask))[mask].abs().max() <= 1e-4


def test_released_config_layout_is_understood():
    # The released answerdotai/ModernBERT-base config.json (abridged): the legacy field names.
    released = {"vocab_size": 50368, "hidden_size": 768, "num_hidden_layers": 22,
                "num_attention_heads": 12, "intermediate_size": 1152, "hidden_activation": "gelu",
                "global_attn_every_n_layers": 3, "local_attention": 128,
                "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
                "max_position_embeddings": 8192, "norm_eps": 1e-05, "norm_bias": False,
                "attention_bias": False, "mlp_bias": False, "decoder_bias": True,
                "pad_token_id": 50283, "cls_token_id": 50281, "sep_token_id": 50282,
                "initializer_range": 0.02, "tie_word_embeddings": True}
    assert Config(**hf_format.config_from_hf(released)) == config_for("base")
    with pytest.raises(ValueError, match="attention_bias"):
        hf_format.config_from_hf({**released, "attention_bias": True})


def test_loading_a_mismatched_checkpoint_names_the_tensor(tmp_path):
    seeded(CONFIGS["narrow"]).save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.Wo.weight"] = \
        tensors["model.layers.1.mlp.Wo.weight"][:, :-1].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp.Wo.weight"):
        ModernBERT.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- BERT mode

# Every switch at BERT's (config_for("bert-base")) at test sizes: d_ff not 4 x d_model, an odd
# head_dim (15: fine without RoPE), the position table exactly as long as the longest test document.
# Weights at std 0.2, not 0.02: attention far from uniform and GELU inputs on its curved part, so
# that q and k swapped, or GELU's tanh approximation, move the logits by more than 1e-4.
BERT_CONFIGS = {
    "bert_narrow": config_for("bert-base", vocab_size=200, n_layers=3, d_model=64, n_heads=4,
                              d_ff=96, max_seq_len=80, init_std=0.2),
    "bert_odd_head_dim": config_for("bert-base", vocab_size=150, n_layers=2, d_model=60, n_heads=4,
                                    d_ff=50, max_seq_len=80, norm_eps=1e-5, init_std=0.2),
    "bert_deep_4x": config_for("bert-base", vocab_size=96, n_layers=5, d_model=96, n_heads=3,
                               d_ff=384, max_seq_len=96, init_std=0.2, pad_id=1),
}
BERT_LENGTHS = [1, 5, 80, 33, 2]


def bert_config_for_transformers(c, **extra):
    return transformers.BertConfig(vocab_size=c.vocab_size, hidden_size=c.d_model,
                                   num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                   intermediate_size=c.d_ff, max_position_embeddings=c.max_seq_len,
                                   layer_norm_eps=c.norm_eps, initializer_range=c.init_std,
                                   pad_token_id=c.pad_id, **extra)


def assert_same_logits_as_transformers(ours, hf, seed):
    """Padded batch with a mask, and the same documents as one packed stream with cu_seqlens: our
    logits equal transformers' on every real token, to 1e-4."""
    ids, mask = padded_batch(BERT_LENGTHS, ours.config.vocab_size, seed=seed)
    with torch.no_grad():
        padded, _ = ours(ids, attention_mask=mask)
        packed, _ = ours(ids[mask], cu_seqlens=modernbert.cu_seqlens_of(mask.sum(-1)))
    theirs = hf_logits(hf.eval(), ids, mask)
    assert (padded - theirs)[mask].abs().max() <= 1e-4
    assert (packed - theirs[mask]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", BERT_CONFIGS)
def test_transformers_bert_checkpoint_loads_with_same_logits(name, tmp_path):
    c = BERT_CONFIGS[name]
    torch.manual_seed(2)
    hf = transformers.BertForMaskedLM(bert_config_for_transformers(c, type_vocab_size=2)).eval()
    with torch.no_grad():  # random norms and biases (init sets them to 1 and 0), and segment rows
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
        hf.bert.embeddings.token_type_embeddings.weight.normal_()
    hf.save_pretrained(tmp_path)
    ours = ModernBERT.from_pretrained(tmp_path).eval()
    assert ours.config == c
    assert_same_logits_as_transformers(ours, hf, seed=3)


@pytest.mark.parametrize("name", BERT_CONFIGS)
def test_ours_bert_saved_loads_in_transformers_with_same_logits(name, tmp_path):
    import json
    ours = seeded(BERT_CONFIGS[name])
    ours.save_pretrained(tmp_path)
    hf, info = transformers.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["model_type"] == "bert" and hf_config["type_vocab_size"] == 1
    assert_same_logits_as_transformers(ours, hf, seed=4)
    again = ModernBERT.from_pretrained(tmp_path)  # and back: the same tensors
    assert again.config == ours.config
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in ours.state_dict().items())


def test_released_bert_config_layout_is_understood():
    # bert-base-uncased's config.json (abridged): the BERT preset, and its parameter count.
    released = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
                "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
                "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
                "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
                "num_hidden_layers": 12, "pad_token_id": 0, "position_embedding_type": "absolute",
                "type_vocab_size": 2, "vocab_size": 30522}
    assert Config(**hf_format.config_from_hf(released)) == config_for("bert-base")
    with pytest.raises(ValueError, match="hidden_act"):
        hf_format.config_from_hf({**released, "hidden_act": "gelu_new"})
    with torch.device("meta"):
        ours = ModernBERT(config_for("bert-base"))
        hf = transformers.BertForMaskedLM(transformers.BertConfig(**released))
    # 109,514,298 in transformers, whose segment table has 2 rows of 768; ours folds row 0 in.
    assert sum(p.numel() for p in hf.parameters()) - 2 * 768 == \
        sum(p.numel() for p in ours.parameters())


def parameter_shapes(config):
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in ModernBERT(config).named_parameters()}


def test_each_bert_switch_changes_only_what_it_names():
    """Parameter counts by hand, from the ModernBERT config below to each switch alone, to BERT."""
    V, n_layers, d, d_ff, T = 320, 4, 64, 96, 512
    c = Config(vocab_size=V, n_layers=n_layers, d_model=d, n_heads=4, d_ff=d_ff, window=16,
               max_seq_len=T, **SPECIAL)
    # Wqkv, Wo, GeGLU Wi and Wo, 2 norms
    per_layer = 3 * d * d + d * d + d * 2 * d_ff + d_ff * d + 2 * d
    # layer 0: no attn_norm; final norm; head
    modern = V * d + d + n_layers * per_layer - d + d + (d * d + d) + V
    assert modern == 164_800
    shapes = {"modernbert": parameter_shapes(c)}
    # the decoder is tied
    assert sum(math.prod(s) for s in shapes["modernbert"].values()) == modern
    biases = (n_layers * (3 * d + d + d_ff + d + 2 * d) - d  # Wqkv, Wo, Wi (d_ff wide), Wo, norms
              + d + d                                        # embed_norm, final_norm
              + (d + d))                                     # head dense and norm
    expected_change = {"positions": T * d,                  # the position table: 512 x 64 = 32,768
                       "mlp": -n_layers * d * d_ff,         # Wi: d x d_ff, not d x 2 d_ff: -24,576
                       "bias": biases + n_layers * d_ff,    # GeGLU's Wi bias is 2 d_ff wide: 2,752
                       "prenorm": 0}                        # layer 0's attn_norm in, final_norm out
    assert list(expected_change.values()) == [32_768, -24_576, 2_752, 0]
    switched = {"positions": dict(positions="learned"), "mlp": dict(mlp="gelu"),
                "bias": dict(bias=True), "prenorm": dict(prenorm=False),
                "global": dict(global_every=1)}
    for switch, change in switched.items():
        shapes[switch] = parameter_shapes(replace_config(c, **change))
        count = sum(math.prod(s) for s in shapes[switch].values())
        assert count == modern + expected_change.get(switch, 0), switch
        before, after = shapes["modernbert"], shapes[switch]
        differing = {n for n in before.keys() | after.keys() if before.get(n) != after.get(n)}
        assert differing == {
            "positions": {"pos_embeddings.weight"},
            "mlp": {f"layers.{i}.mlp.Wi.weight" for i in range(n_layers)},
            "bias": {n for n in after if n.endswith(".bias") and n != "decoder.bias"},
            "prenorm": {"layers.0.attn_norm.weight", "final_norm.weight"},
            "global": set()}[switch], switch
    assert sum(shapes["bias"][n][0] for n in shapes["bias"] if n.endswith(".bias")) - V == \
        biases + n_layers * d_ff
    # All switches at BERT's: the changes add up (post-norm moves one bias as it moves one weight).
    bert = replace_config(c, positions="learned", mlp="gelu", bias=True, prenorm=False,
                          global_every=1)
    count = sum(math.prod(s) for s in parameter_shapes(bert).values())
    assert count == modern + T * d - n_layers * d * d_ff + biases
    # ... and is what transformers' BertForMaskedLM has, less its one segment row.
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=4,
        intermediate_size=d_ff, max_position_embeddings=T, type_vocab_size=1))
    assert sum(p.numel() for p in hf.parameters()) == count + d


def test_global_every_one_is_global_attention_everywhere():
    model = seeded(replace_config(CONFIGS["narrow"], global_every=1))
    assert all(block.is_global and block.attn.half_window is None for block in model.layers)
    with torch.device("meta"):
        assert all(block.is_global for block in ModernBERT(config_for("bert-mini")).layers)


def test_mixed_switches_run_but_do_not_export(tmp_path):
    """Any mix of switches is a model that trains (the ablations between BERT and ModernBERT), but
    transformers has neither model for it, so save_pretrained says so instead of
    writing a wrong one."""
    config = replace_config(CONFIGS["narrow"], positions="learned", bias=True)
    model = seeded(config)
    ids, mask = padded_batch([9, 4], config.vocab_size)
    with torch.no_grad():
        logits, _ = model(ids, attention_mask=mask)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="mixes BERT"):
        model.save_pretrained(tmp_path)


def test_sinusoidal_positions_are_the_papers_formula_and_restart_per_document(tmp_path):
    """The ladder's fixed absolute positions: Vaswani et al.'s PE(p, 2i) = sin(p / 10000^(2i/d)),
    PE(p, 2i+1) = cos(p / 10000^(2i/d)), worked by hand for d = 4 (frequencies 1 and 1/100), at the
    token table's init scale. Nothing is learned (ModernBERT's parameters exactly), the table is
    added (reordering a document's tokens changes more than the order of its outputs), each
    document of a packed stream starts at position 0, and transformers has no such model."""
    by_hand = torch.tensor([[0.0, 1.0, 0.0, 1.0],
                            [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)],
                            [math.sin(5), math.cos(5), math.sin(0.05), math.cos(0.05)]])
    table = modernbert.sinusoids(torch.tensor([0, 1, 5]), 4, init_std=0.02)
    assert torch.allclose(table, by_hand * 0.02 * math.sqrt(2), atol=1e-7)
    config = replace_config(CONFIGS["narrow"], positions="sinusoidal")
    assert parameter_shapes(config) == parameter_shapes(CONFIGS["narrow"])
    model = seeded(config)
    g = torch.Generator().manual_seed(3)
    lengths = [9, 14]
    ids = torch.randint(3, config.vocab_size, (sum(lengths),), generator=g)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    order = torch.randperm(lengths[0], generator=g)
    with torch.no_grad():
        packed, _ = model(ids, cu_seqlens=cu)                                       # (n, vocab)
        alone = torch.cat([model(ids[cu[i]:cu[i + 1]][None])[0][0] for i in range(2)])
        reordered = model(ids[:lengths[0]][order][None])[0][0]
    assert float((packed - alone).abs().max()) <= 1e-5
    assert float((reordered - alone[:lengths[0]][order]).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="transformers has no model"):
        model.save_pretrained(tmp_path)


# ---------------------------------------------------------------------------- unpadding and packing

def test_batch_invariance_alone_padded_packed():
    config = CONFIGS["narrow"]
    model = seeded(config)
    lengths = lengths_for(config)
    ids, mask = padded_batch(lengths, config.vocab_size, seed=2)
    with torch.no_grad():
        batched, _ = model(ids, attention_mask=mask)
        stream = ids[mask]
        cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
        packed, _ = model(stream, cu_seqlens=cu)
        for i, n in enumerate(lengths):
            alone, _ = model(ids[i:i + 1, :n])
            assert torch.isfinite(alone).all()
            assert (alone[0] - batched[i, :n]).abs().max() <= 1e-5
            assert (alone[0] - packed[cu[i]:cu[i + 1]]).abs().max() <= 1e-5
    assert torch.isfinite(batched).all() and torch.isfinite(packed).all()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("longest", ["3 windows", "2 windows"])
def test_sdpa_kernels_equal_the_attention_definition(name, longest):
    """attention_reference is the definition (a dense same-document, |i - j| <= w mask); the
    SDPA path's global (length-grouped, reordered) and local kernels must equal it: blocked when a
    document is longer than two windows, else the global path's calls with a band mask."""
    config = CONFIGS[name]
    model = seeded(config)
    longest = 3 * config.window + 1 if longest == "3 windows" else 2 * config.window
    lengths = [5, 7, 5, 1, longest, 7, config.window // 2 + 1, config.window + 1]
    ids = torch.randint(3, config.vocab_size, (sum(lengths),),
                        generator=torch.Generator().manual_seed(7))
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    with torch.no_grad():
        fast, _ = model(ids, cu_seqlens=cu)
        model.backend = "reference"
        definition, _ = model(ids, cu_seqlens=cu)
    assert (fast - definition).abs().max() <= 1e-5
    blocked = Documents(cu, config, "sdpa").local_mask is not None
    assert blocked == (longest > 2 * config.window)


def test_no_attention_across_documents_in_a_packed_stream():
    """Packed [70 tokens | 50 tokens]: each document's logits are those of the document run alone,
    whatever the other document holds (checked both ways, the second document is the one that
    follows another and could look back into it)."""
    config = CONFIGS["wide_heads"]
    model = seeded(config)
    g = torch.Generator().manual_seed(3)
    first, second, other = (torch.randint(3, config.vocab_size, (n,), generator=g)
                            for n in (70, 50, 50))
    cu = torch.tensor([0, 70, 120], dtype=torch.int32)
    with torch.no_grad():
        a, _ = model(torch.cat([first, second]), cu_seqlens=cu)
        b, _ = model(torch.cat([first, other]), cu_seqlens=cu)
        first_alone, _ = model(first[None])
        second_alone, _ = model(second[None])
    assert torch.equal(a[:70], b[:70])  # the first document cannot tell what follows it
    errors = [float((a[:70] - first_alone[0]).abs().max()),
              float((a[70:] - second_alone[0]).abs().max())]
    assert max(errors) <= 1e-5, errors  # nor can the second tell what precedes it


def rotate_half_rope(x, positions, theta):
    """RoPE written out: (n, heads, head_dim) rotated by position * theta^(-2i/head_dim), pairs
    (i, i + head_dim/2), as transformers' rotate_half does."""
    hd = x.shape[-1]
    angles = positions.double()[:, None] * \
        theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1)[:, None] for f in (torch.cos, torch.sin))
    return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1) * sin


def dense_reference_logits(model, ids, lengths):
    """A second, plain implementation of the whole forward in float64, from the model's weights
    (by their Hugging Face-compatible names): dense attention over the packed stream, with a mask
    same-document, and |i - j| <= window/2 in local layers. No gathers, groups or blocks."""
    c, W = model.config, {k: v.double() for k, v in model.state_dict().items()}
    n = len(ids)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))    # (n,)
    pos = torch.cat([torch.arange(k) for k in lengths])                                   # (n,)
    norm = lambda x, name: F.layer_norm(x, (c.d_model,), W[name], None, c.norm_eps)
    x = norm(W["tok_embeddings.weight"][ids], "embed_norm.weight")                        # (n, d)
    for i in range(c.n_layers):
        L, is_global = f"layers.{i}.", i % c.global_every == 0
        h = x if i == 0 else norm(x, L + "attn_norm.weight")
        q, k, v = (h @ W[L + "attn.Wqkv.weight"].T).view(n, 3, c.n_heads, c.head_dim).unbind(1)
        theta = c.global_theta if is_global else c.local_theta
        q, k = rotate_half_rope(q, pos, theta), rotate_half_rope(k, pos, theta)
        allowed = doc[:, None] == doc[None, :]                                             # (n, n)
        if not is_global:
            allowed &= (pos[:, None] - pos[None, :]).abs() <= c.window // 2
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(c.head_dim)
        attn = torch.einsum("hij,jhd->ihd", scores.masked_fill(~allowed, -math.inf).softmax(-1), v)
        x = x + attn.reshape(n, c.d_model) @ W[L + "attn.Wo.weight"].T
        a, gate = (norm(x, L + "mlp_norm.weight") @ W[L + "mlp.Wi.weight"].T).chunk(2, dim=-1)
        x = x + (F.gelu(a) * gate) @ W[L + "mlp.Wo.weight"].T
    x = norm(F.gelu(norm(x, "final_norm.weight") @ W["head.dense.weight"].T), "head.norm.weight")
    return x @ W["tok_embeddings.weight"].T + W["decoder.bias"]                         # (n, vocab)


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_stream_matches_dense_reference_and_documents_alone(name):
    """Packed streams whose equal-length documents are not side by side (the SDPA global path
    regroups them and must put every token back where it was), some longer than the window: the
    logits equal a dense-mask reference implementation, and each document run alone."""
    config = CONFIGS[name]
    model = seeded(config)
    g = torch.Generator().manual_seed(6)
    for lengths in ([5, 7, 5], [40, 3, 40, 9, 3, 40], [33, 1, 2, 33, 1, 40, 2], [7, 5, 7, 5, 7]):
        ids = torch.randint(3, config.vocab_size, (sum(lengths),), generator=g)
        cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
        with torch.no_grad():
            packed, _ = model(ids, cu_seqlens=cu)  # (n, vocab)
            alone = torch.cat([model(ids[cu[i]:cu[i + 1]][None])[0][0]
                               for i in range(len(lengths))])
        to_reference = float((packed.double()
                              - dense_reference_logits(model, ids, lengths)).abs().max())
        to_alone = float((packed - alone).abs().max())
        assert to_reference <= 1e-5 and to_alone <= 1e-5, (lengths, to_reference, to_alone)


def test_all_padding_row_and_padding_tokens_do_no_harm():
    config = CONFIGS["narrow"]
    model = seeded(config)
    ids, mask = padded_batch([5, 1], config.vocab_size)
    ids = torch.cat([ids, torch.full((1, 5), 7)])
    mask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)])  # a row with no real token
    with torch.no_grad():
        logits, _ = model(ids, attention_mask=mask)
        changed, _ = model(ids.masked_fill(~mask, 9), attention_mask=mask)
    assert torch.isfinite(logits).all() and logits[2].abs().max() == 0
    assert torch.equal(logits, changed)


# ----------------------------------------------------------------------------- the local window

def layer_output(model, index, x, cu):
    """The attention output of one layer, on a single stream x (total_tokens, d_model)."""
    docs = Documents(cu, model.config, model.attention_backend)
    return model.layers[index].attn(x, docs)


@pytest.mark.parametrize("backend", ["sdpa", "flash-attn", "torch-varlen"])
@pytest.mark.parametrize("name", CONFIGS)
def test_window_boundary(monkeypatch, name, backend):
    """Key j changes query i's output in a local layer iff |i - j| <= window / 2. The FlashAttention
    backends run their fakes (see use_backend), so this checks the (left, right) window they get."""
    config = CONFIGS[name]
    model = seeded(config)
    use_backend(monkeypatch, model, backend)
    w = config.window // 2
    n = 6 * config.window + 7
    x = torch.randn(n, config.d_model)
    cu = torch.tensor([0, n], dtype=torch.int32)
    local = next(i for i, b in enumerate(model.layers) if not b.is_global)
    glob = next(i for i, b in enumerate(model.layers) if b.is_global)
    for query in [0, w - 1, 2 * w + 3, n // 2, n - 1]:
        for sign in (+1, -1):
            inside, outside = query + sign * w, query + sign * (w + 1)
            for key, sees in [(inside, True), (outside, False)]:
                if not 0 <= key < n:
                    continue
                y = x.clone()
                y[key] += 1.0
                with torch.no_grad():
                    delta = (layer_output(model, local, y, cu)
                             - layer_output(model, local, x, cu))[query].abs().max()
                    delta_global = (layer_output(model, glob, y, cu)
                                    - layer_output(model, glob, x, cu))[query].abs().max()
                assert (delta > 1e-4) if sees else (delta <= 1e-6), (query, key, float(delta))
                assert delta_global > 1e-4  # a global layer sees every distance


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces while the mode is on."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_local_attention_memory_grows_linearly():
    config = CONFIGS["narrow"]
    model = seeded(config)
    local = next(i for i, b in enumerate(model.layers) if not b.is_global)
    largest = {}
    for n in (1024, 4096):
        x = torch.randn(n, config.d_model)
        with torch.no_grad(), LargestTensor() as probe:
            layer_output(model, local, x, torch.tensor([0, n], dtype=torch.int32))
        largest[n] = probe.largest
    # 4x the tokens: about 4x the memory (linear), where a dense n x n mask or score matrix
    # would grow 16x (and already hold n * n = 16.7M elements at n = 4096).
    assert largest[4096] <= 4.5 * largest[1024], largest
    assert largest[4096] < 4096 * 4096 // 4, largest


# ----------------------------------------------------------------------------- the MLM head

def test_sparse_prediction_loss_equals_dense_loss():
    config = CONFIGS["one_global"]
    model = seeded(config)
    ids, mask = padded_batch([40, 17, 3], config.vocab_size, seed=4)
    g = torch.Generator().manual_seed(5)
    labels = torch.where(mask & (torch.rand(ids.shape, generator=g) < 0.3), ids, -100)
    labels[2, 0] = ids[2, 0]  # at least one label in the short row
    with torch.no_grad():
        dense, _ = model(ids, attention_mask=mask)
        sparse_logits, sparse_loss = model(ids, attention_mask=mask, labels=labels)
    dense_loss = F.cross_entropy(dense.view(-1, config.vocab_size), labels.view(-1),
                                 ignore_index=-100)
    assert abs(float(sparse_loss) - float(dense_loss)) <= 1e-5
    assert (sparse_logits - dense[labels != -100]).abs().max() <= 1e-5
    assert sparse_logits.shape == ((labels != -100).sum(), config.vocab_size)


def test_init_follows_the_paper():
    config = config_for("small", vocab_size=4096)
    model = ModernBERT(config)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * config.n_layers)
    wqkv, wo = model.layers[1].attn.Wqkv.weight, model.layers[1].mlp.Wo.weight
    assert wqkv.abs().max() <= 2 * std and wo.abs().max() <= 2 * out_std
    # a normal cut at 2 std keeps 0.88 of its std
    assert abs(wqkv.std().item() - std * 0.88) < 0.002
    assert abs(wo.std().item() - out_std * 0.88) < 0.0005
    # The head's dense layer at 0.02, as the official pretraining code has it (transformers' port
    # depth-scales it like Wo): its std tells the two apart (0.0176 vs 0.0051 for 4 layers).
    dense = model.head.dense.weight
    assert dense.abs().max() <= 2 * std and abs(dense.std().item() - std * 0.88) < 0.001
    assert model.decoder.weight is model.tok_embeddings.weight
    assert torch.equal(model.decoder.bias, torch.zeros(config.vocab_size))
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters()
               if "norm" in n)
    assert isinstance(model.layers[0].attn_norm, torch.nn.Identity)


# ----------------------------------------------------------------------------- FLOPs

def counted_flops_per_token(model, n):
    """FLOPs per token that PyTorch's FlopCounterMode sees in one forward over n tokens (SDPA's
    math kernel: a dense n x n score matrix, so this is exact for global layers only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(3, model.config.vocab_size, (1, n)))
    return counter.get_total_flops() / n


def test_flops_per_token_matches_a_flop_counter():
    """All layers global: flops_per_token equals PyTorch's FLOP counter exactly. With local layers,
    each local layer counts, per token, the FLOPs of the most keys any query can see: a brute-force
    count over the same-document |i - j| <= window/2 mask, priced per key at the counter's own
    slope (FLOPs per token per layer per extra key). Training is 3x a forward (backward = 2x)."""
    all_global = seeded(replace_config(CONFIGS["narrow"], global_every=1))
    mixed = seeded(CONFIGS["narrow"])  # layers 0 and 3 global, 1 and 2 local, window 16
    n_layers, n_local = 4, 2
    counted = {n: counted_flops_per_token(all_global, n) for n in (10, 17, 18, 60)}
    for n, flops in counted.items():
        assert all_global.flops_per_token(n, training=False) == pytest.approx(flops, rel=1e-9)
    per_key = (counted[60] - counted[18]) / 42 / n_layers   # one more key, in one layer
    for n in (10, 17, 18, 60):
        i = torch.arange(n)
        keys = int(((i[:, None] - i[None, :]).abs() <= 16 // 2).sum(1).max())  # 10, 17, 17, 17
        expected = counted[n] - n_local * per_key * (n - keys)
        assert mixed.flops_per_token(n, training=False) == pytest.approx(expected, rel=1e-9), n
    assert mixed.flops_per_token(60) == 3 * mixed.flops_per_token(60, training=False)
    bert = seeded(BERT_CONFIGS["bert_narrow"])  # all global, a GELU MLP d_ff wide: exact as well
    for n in (10, 60):
        assert bert.flops_per_token(n, training=False) == \
            pytest.approx(counted_flops_per_token(bert, n), rel=1e-9)


def replace_config(config, **changes):
    from dataclasses import replace
    return replace(config, **changes)


# ----------------------------------------------------------------------- CUDA kernels' glue, on CPU
# The two FlashAttention kernels run only on CUDA. Here each is replaced by a fake that checks the
# contract its documentation states (and its C++ checks enforce) and computes what the
# documentation says it computes; the model around it must then give the SDPA path's output.
# FlexAttention runs for real on CPU (unfused: every score, no backward), so its glue is held
# to the definition exactly; the tiles that only the CUDA kernel uses are checked on their own.

def documented_attention(q, k, v, cu_seqlens, left, right):
    """What both FlashAttentions document, computed the plain way: within each document, query i
    sees keys i - left ... i + right inclusive (-1: no limit); fp32 inside, q's dtype out."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        i, j = torch.arange(end - start)[:, None], torch.arange(end - start)[None, :]
        visible = ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))
        qd, kd, vd = (t[start:end].float() for t in (q, k, v))  # (length, heads, head_dim)
        scores = torch.einsum("ihd,jhd->hij", qd, kd) / q.shape[-1] ** 0.5
        probs = scores.masked_fill(~visible, -math.inf).softmax(-1)
        out[start:end] = torch.einsum("hij,jhd->ihd", probs, vd).to(q.dtype)
    return out


def check_flash_contract(q, k, v, cu_q, cu_k, max_q, max_k, window_size):
    """The arguments both varlen FlashAttention APIs document."""
    assert q.dtype in (torch.float16, torch.bfloat16), q.dtype             # fp16 / bf16 only
    assert k.dtype == q.dtype and v.dtype == q.dtype
    # (total_tokens, heads, head_dim)
    assert q.dim() == 3 and k.shape == q.shape and v.shape == q.shape
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    for cu in (cu_q, cu_k):
        assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device, cu.dtype
        assert int(cu[0]) == 0 and int(cu[-1]) == len(q) and bool((cu.diff() >= 0).all())
    assert torch.equal(cu_q, cu_k)  # self-attention: queries and keys in the same documents
    for m in (max_q, max_k):
        # a Python int, not a tensor
        assert type(m) is int and m >= int(cu_q.diff().max()), type(m)
    assert type(window_size) is tuple and len(window_size) == 2
    assert all(type(w) is int for w in window_size)


def fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                     scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn, torch 2.11+: (T, H, D) in, (T, H, D) out."""
    check_flash_contract(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size)
    assert return_aux is None and scale is None and not enable_gqa  # default scale 1/sqrt(head_dim)
    return documented_attention(query, key, value, cu_seq_q, *window_size)


def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), **rest):
    """flash_attn.flash_attn_varlen_func, flash-attn 2.3+ (window_size)."""
    check_flash_contract(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         window_size)
    assert dropout_p == 0.0 and softmax_scale is None and not causal and not rest
    return documented_attention(q, k, v, cu_seqlens_q, *window_size)


FAKES = {"flash-attn": ("flash_attn_varlen_func", fake_flash_attn_varlen_func),
         "torch-varlen": ("varlen_attn", fake_varlen_attn)}


def use_backend(monkeypatch, model, backend):
    """Forces `backend` on a CPU model; a FlashAttention backend runs its fake."""
    if backend in FAKES:
        monkeypatch.setattr(modernbert, *FAKES[backend])
    model.backend = backend
    assert model.attention_backend == backend


def test_documented_attention_is_the_definition():
    """The fakes' arithmetic against attention_reference (fp32), so that a glue test cannot pass
    because the fake and the glue are wrong in the same way."""
    config = CONFIGS["narrow"]
    lengths = [1, 8, 9, 59, 1, 16]
    cu = modernbert.cu_seqlens_of(lengths)
    q, k, v = torch.randn(3, sum(lengths), 4, 16,
                          generator=torch.Generator().manual_seed(10)).unbind(0)
    docs = Documents(cu, config, "reference")
    for window_size, half_window in [((8, 8), 8), ((-1, -1), None)]:
        fake = documented_attention(q, k, v, cu, *window_size)
        assert (fake - modernbert.attention_reference(q, k, v, docs, half_window)).abs().max() \
            <= 1e-6


@pytest.mark.parametrize("backend", FAKES)
@pytest.mark.parametrize("name", ["narrow", "wide_heads"])
def test_flash_glue_matches_sdpa_path(monkeypatch, backend, name):
    """An fp32 model, the glue casting q, k, v to bf16 for the (fake) kernel and its output back:
    padded and packed, lengths 1, the half window and the window, each -1 and +1, and many windows;
    global and local layers."""
    config = CONFIGS[name]
    model = seeded(config)
    ids, mask = padded_batch(lengths_for(config), config.vocab_size, seed=8)
    cu = modernbert.cu_seqlens_of(mask.sum(-1))
    with torch.no_grad():
        sdpa_padded, _ = model(ids, attention_mask=mask)
        sdpa_packed, _ = model(ids[mask], cu_seqlens=cu)
        use_backend(monkeypatch, model, backend)
        padded, _ = model(ids, attention_mask=mask)
        packed, _ = model(ids[mask], cu_seqlens=cu)
    # bf16 keeps 8 significant bits: q, k, v go to the kernel rounded by up to 2^-9 of their size,
    # and its output comes back rounded as much, in every layer. Attention adds a small part of
    # the residual stream (Wo starts at std 0.02 / sqrt(2 n_layers)), so at the logits this
    # measured 0.9e-5 (narrow) and 1.7e-5 (wide_heads) of the largest logit. A window one key too
    # wide or too narrow in the local layers measured 7e-4 to 9e-4: the bound sits between.
    scale = sdpa_padded[mask].abs().max()
    assert (padded - sdpa_padded)[mask].abs().max() <= 1e-4 * scale
    assert (packed - sdpa_packed).abs().max() <= 1e-4 * scale
    assert torch.equal(padded[mask], packed) and padded[~mask].abs().max() == 0


@needs_flex
@no_compile_warning
@pytest.mark.parametrize("name", CONFIGS)
def test_flex_path_equals_the_definition(name):
    """FlexAttention's glue (padding to whole tiles, the layout, the mask_mod) on CPU, in fp32:
    packed lengths that cross 128-token tiles, and a padded batch."""
    config = CONFIGS[name]
    model = seeded(config)
    lengths = [1, 8, 9, 3 * config.window + 1, 300, 5, config.window // 2 + 1]
    g = torch.Generator().manual_seed(9)
    stream = torch.randint(3, config.vocab_size, (sum(lengths),), generator=g)
    ids, mask = padded_batch(lengths_for(config), config.vocab_size)
    outputs = {}
    for backend in ("reference", "flex"):
        model.backend = backend
        with torch.no_grad():
            outputs[backend] = (model(stream, cu_seqlens=modernbert.cu_seqlens_of(lengths))[0],
                                model(ids, attention_mask=mask)[0])
    for flex, definition in zip(outputs["flex"], outputs["reference"]):
        assert (flex - definition).abs().max() <= 1e-5


def tiles(mask, reduce):
    """(n, n) -> (n / 128, n / 128): `reduce` over each 128 x 128 tile."""
    n_tiles = len(mask) // 128
    return reduce(mask.view(n_tiles, 128, n_tiles, 128).transpose(1, 2).flatten(2), -1).values


def blocks_to_dense(counts, indices):
    dense = torch.zeros(counts.shape[-1], counts.shape[-1], dtype=torch.bool)
    for row, (count, listed) in enumerate(zip(counts[0, 0].tolist(), indices[0, 0])):
        dense[row, listed[:count].long()] = True
    return dense


@needs_flex
# a tile is 128: 127 apart at most
@pytest.mark.parametrize("half_window", [None, 8, 64, 126, 127, 128])
@pytest.mark.parametrize("lengths", [[1, 8, 9, 59, 1, 300, 16], [128, 256, 5], [256]],
                         ids=["mixed", "aligned", "one_doc"])
def test_flex_block_mask_lists_every_visible_tile(lengths, half_window):
    """On CUDA, FlexAttention skips the tiles a BlockMask leaves out and skips mask_mod in "full"
    ones; the unfused CPU version does neither, so the tiles are checked against a dense mask:
    every tile with a visible pair is listed, "full" tiles are entirely visible, partial
    ones not."""
    config = replace_config(CONFIGS["narrow"], window=2 * (half_window or 8))
    docs = Documents(modernbert.cu_seqlens_of(lengths), config, "flex")
    block_mask = docs.flex_global if half_window is None else docs.flex_local
    n, n_padded = sum(lengths), -(-sum(lengths) // 128) * 128
    doc = torch.repeat_interleave(torch.arange(len(lengths) + 1),
                                  torch.tensor(lengths + [n_padded - n]))
    i = torch.arange(n_padded)
    visible = doc[:, None] == doc[None, :]  # the padding: a document of its own
    if half_window is not None:
        visible &= (i[:, None] - i[None, :]).abs() <= half_window
    partial = blocks_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = blocks_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any()
    # nothing visible skipped, none empty
    assert torch.equal(full | partial, tiles(visible, torch.max))
    # "full" is full, and all full are
    assert torch.equal(full, tiles(visible, torch.min))
    assert block_mask.shape[-2:] == (n_padded, n_padded)


# ----------------------------------------------------------------------------- which kernel runs

def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                     return_aux=None):
    raise AssertionError("torch 2.10's signature, without window_size: never called")


@pytest.mark.parametrize("capability, flash, varlen, flex, expected", [
    ((8, 9), True, fake_varlen_attn, True, "flash-attn"),      # a 4090 with flash-attn installed
    ((8, 9), False, fake_varlen_attn, True, "torch-varlen"),   # a 4090 with a plain torch 2.11+
    ((8, 9), False, varlen_attn_2_10, True, "flex"),           # torch 2.10: varlen_attn, no window
    ((8, 0), False, None, True, "flex"),                       # torch 2.5 ... 2.9
    ((7, 5), True, fake_varlen_attn, True, "flex"),            # a T4: no FlashAttention runs there
    ((8, 0), False, None, False, "sdpa"),                      # no Triton (Windows) or torch 2.4
    ((6, 1), False, None, True, "sdpa"),                       # Pascal: Triton won't compile for it
])
def test_cuda_order(monkeypatch, capability, flash, varlen, flex, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    flash = fake_flash_attn_varlen_func if flash else None
    monkeypatch.setattr(modernbert, "flash_attn_varlen_func", flash)
    monkeypatch.setattr(modernbert, "varlen_attn", varlen)
    monkeypatch.setattr(modernbert, "HAS_TRITON", flex)
    assert modernbert.cuda_backend(torch.device("cuda")) == expected


def test_cpu_runs_sdpa_and_forcing_needs_the_kernel(monkeypatch):
    model = ModernBERT(CONFIGS["narrow"])
    monkeypatch.setattr(modernbert, "flash_attn_varlen_func", fake_flash_attn_varlen_func)
    monkeypatch.setattr(modernbert, "varlen_attn", fake_varlen_attn)
    monkeypatch.setattr(modernbert, "flex_attention", lambda *args, **kwargs: None)  # never called
    assert model.attention_backend == "sdpa"  # whatever is installed: the CUDA kernels need CUDA
    for backend, attribute, absent in [("flash-attn", "flash_attn_varlen_func", None),
                                       ("torch-varlen", "varlen_attn", varlen_attn_2_10),
                                       ("flex", "flex_attention", None)]:
        model.backend = backend
        assert model.attention_backend == backend
        monkeypatch.setattr(modernbert, attribute, absent)
        with pytest.raises(ValueError, match=backend):
            model.attention_backend
    model.backend = "flash"  # the old name: refused, not silently the SDPA path
    with pytest.raises(ValueError, match="flash-attn, torch-varlen, flex, sdpa, reference"):
        model.attention_backend


def test_this_torch_has_varlen_with_a_window_from_2_11():
    from_2_11 = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 11)
    assert modernbert.has_window(modernbert.varlen_attn) == from_2_11


# -------------------------------------------------------------------------- the real kernels (CUDA)

def cuda_kernels():
    """The backends this machine's GPU and install can run, fastest first; [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    ampere = torch.cuda.get_device_capability() >= (8, 0)
    return [backend for backend, runs in [
        ("flash-attn", ampere and modernbert.flash_attn_varlen_func is not None),
        ("torch-varlen", ampere and modernbert.has_window(modernbert.varlen_attn)),
        ("flex", modernbert.flex_attention is not None and modernbert.HAS_TRITON)] if runs]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
on_cuda = pytest.mark.parametrize("backend", [
    pytest.param(b, marks=pytest.mark.skipif(b not in cuda_kernels(), reason=f"needs CUDA and {b}"))
    for b in ("flash-attn", "torch-varlen", "flex")])


@needs_cuda
def test_cuda_picks_the_fastest_kernel_at_hand():
    model = seeded(CONFIGS["narrow"]).cuda()
    assert model.attention_backend == (cuda_kernels() + ["sdpa"])[0]
    from_2_11 = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 11)
    if from_2_11 and torch.cuda.get_device_capability() >= (8, 0):  # a plain torch is enough
        assert model.attention_backend in ("flash-attn", "torch-varlen")


@on_cuda
@pytest.mark.parametrize("name", CONFIGS)
def test_cuda_kernel_matches_sdpa_path(backend, name):
    config = CONFIGS[name]
    model = seeded(config).cuda().to(torch.bfloat16)
    ids, mask = padded_batch(lengths_for(config), config.vocab_size)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        model.backend = backend
        fast, _ = model(ids, attention_mask=mask)
        model.backend = "sdpa"
        sdpa, _ = model(ids, attention_mask=mask)
    scale = sdpa[mask].float().abs().max()
    assert (fast - sdpa)[mask].float().abs().max() <= 2e-2 * scale


@on_cuda
def test_cuda_kernel_gradients_match_sdpa_path(backend):
    """The kernel's backward, in a training step under bf16 autocast. The bound, 5% of each
    gradient's largest entry, allows for bf16 rounding and was not yet checked on a GPU; the
    window itself is held exactly by the tests above and test_cuda_kernel_window_boundary."""
    config = CONFIGS["narrow"]
    model = seeded(config).cuda().train()
    ids, mask = padded_batch(lengths_for(config), config.vocab_size)
    grads = {}
    for b in (backend, "sdpa"):
        model.backend = b
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(ids.cuda(), attention_mask=mask.cuda())
        logits.float().square().mean().backward()
        grads[b] = [p.grad.clone() for p in model.parameters()]
    for fast, sdpa in zip(grads[backend], grads["sdpa"]):
        assert (fast - sdpa).abs().max() <= 5e-2 * sdpa.abs().max()


@on_cuda
def test_cuda_kernel_window_boundary(backend):
    config = CONFIGS["narrow"]
    model = seeded(config).cuda()
    model.backend = backend
    w, n = config.window // 2, 200
    x = torch.randn(n, config.d_model, device="cuda")
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    query = 100
    for key, sees in [(query + w, True), (query + w + 1, False),
                      (query - w, True), (query - w - 1, False)]:
        y = x.clone()
        y[key] += 1.0
        with torch.no_grad():
            delta = (layer_output(model, 1, y, cu)
                     - layer_output(model, 1, x, cu))[query].abs().max()
        assert (delta > 1e-3) if sees else (delta == 0), (key, float(delta))


# ----------------------------------------------------------------------------- config, export

def test_impossible_shapes_are_refused_with_the_reason():
    for change, reason in [(dict(n_heads=3), "not divisible by n_heads"),
                           (dict(n_heads=256), "head_dim d_model / n_heads = 1 must be even"),
                           (dict(window=7), "window 7 must be even"),
                           (dict(n_layers=0), "n_layers must be"),
                           (dict(attn_out_dropout=1.0), "attn_out_dropout"),
                           (dict(positions="alibi"), "positions must be"),
                           (dict(positions="sinusoidal", d_model=9, n_heads=3),
                            "d_model 9 must be even"),
                           (dict(mlp="swiglu"), "mlp 'geglu'")]:
        with pytest.raises(ValueError, match=reason):
            config_for("mini", **change)


def test_export_has_no_probability_dropout(tmp_path):
    """Pretraining dropped the attention output only. transformers applies attention_dropout to
    the probabilities as well, so the export says 0.0: a transformers model in train mode then
    computes exactly what ours computes without dropout."""
    config = replace_config(CONFIGS["narrow"], attn_out_dropout=0.1)
    ours = seeded(config)
    ours.save_pretrained(tmp_path)
    hf = transformers.ModernBertForMaskedLM.from_pretrained(
        tmp_path, attn_implementation="sdpa").train()
    assert hf.config.attention_dropout == 0.0
    ids, mask = padded_batch([40, 17], config.vocab_size)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask.long()).logits
        again = hf(input_ids=ids, attention_mask=mask.long()).logits
        mine, _ = ours.eval()(ids, attention_mask=mask)
    assert torch.equal(theirs, again)
    assert (theirs - mine)[mask].abs().max() <= 1e-4


def test_bench_alternating_pair_differs_only_in_the_span(capsys):
    """bench.py --alternating times two models that must be one model but for the local layers'
    span: where every key is inside the window they give the same logits, beyond it they do not;
    and the run prints one row per length."""
    import bench
    torch.manual_seed(0)
    config = config_for("tiny")  # window 16: a token sees 8 on each side
    models = bench.alternating_and_global(config)
    assert [b.is_global for b in models["all global"].layers] == [True] * config.n_layers
    assert [b.is_global for b in models["alternating"].layers] == [True, False, False]
    for length, same in [(9, True), (40, False)]:
        ids = torch.randint(5, config.vocab_size, (1, length))
        a, g = (m.eval()(ids)[0] for m in models.values())
        assert torch.allclose(a, g, atol=1e-5) == same, length
    bench.main(["--alternating", "--model", "tiny", "--layers", "3", "--row_lengths", "32,64",
                "--repeat", "1", "--warmup", "0", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| row length", "| 32", "| 64"]
    with pytest.raises(SystemExit):
        bench.main(["--alternating", "--row_lengths", "2048,x"])


def test_bench_step_parts_records_every_matmul_of_the_step_once(capsys):
    """bench.py --step_parts replays the step's matmuls: it must see each of them once. Counted
    by hand: every linear layer runs three matmuls in a training step (forward, the gradient of
    its input, the gradient of its weight), each 2 x rows x fan_in x fan_out FLOPs; the encoder's
    run on every token, the head's (dense, decoder) on the masked ones; attention runs in SDPA,
    a forward and a backward call per layer and micro-batch."""
    import bench
    parts = bench.main(["--step_parts", "--model", "tiny", "--layers", "3", "--vocab_size", "512",
                        "--step_len", "64", "--train_batch", "8", "--repeat", "1", "--warmup",
                        "0", "--threads", "1"])
    c = config_for("tiny", vocab_size=512)
    d, ff = c.d_model, c.d_ff
    per_layer = d * 3 * d + d * d + d * 2 * ff + ff * d  # Wqkv, Wo, GeGLU's Wi, its Wo
    head = d * d + d * c.vocab_size                      # dense, decoder
    expected = 3 * 2 * (parts["tokens"] * 3 * per_layer + parts["masked"] * head)
    assert parts["tokens"] == 8 * 64 and 0 < parts["masked"] < parts["tokens"]
    assert parts["matmul_flop"] == expected
    micro_batches = 2
    assert parts["n_matmuls"] == 3 * (3 * 4 + 2) * micro_batches  # 4 linears a layer, 2 in the head
    assert parts["n_attention"] == 3 * 2 * micro_batches
    assert all(parts[k] > 0 for k in ("step", "matmuls", "attention"))
    table = capsys.readouterr().out
    assert f"| its {parts['n_matmuls']} matmuls, replayed alone |" in table
