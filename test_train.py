"""Tests of train.py: schedules, masking, packing, StableAdamW, tiling, exact resume, DDP, faults,
and a smoke run on the real corpus. CPU only, tiny models; python -m pytest -q test_train.py"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from modernbert import Config, ModernBERT

HERE = Path(__file__).resolve().parent


def tiny_args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--model", "tiny", "--seq_len", "32",
            "--tokens", "100000", "--lr", "3e-3", "--warmup_tokens", "256", "--batch_size", "4",
            "--min_batch_size", "2", "--batch_warmup_tokens", "256", "--micro_batch", "2",
            "--eval_tokens", "128", "--eval_every", "3", "--ckpt_every", "2", "--device", "cpu",
            "--dtype", "fp32", *extra]


@pytest.fixture
def losses(log_of):
    def losses(out, phase=1):
        return [(r["step"], r["loss"]) for r in log_of(out, phase) if "loss" in r]
    return losses


@pytest.fixture
def data(tmp_path, write_data):
    rng = np.random.default_rng(1)
    return write_data(tmp_path / "data", rng.integers(5, 90, 200).tolist())


# ----------------------------------------------------------------------------- schedules

def test_lr_schedule_hand_picked_points():
    # phase 1: linear warmup over 1000 tokens, then constant
    assert train.lr_at(1, 250, 1e-3, 1000, 10_000) == pytest.approx(2.5e-4)
    assert train.lr_at(1, 1000, 1e-3, 1000, 10_000) == pytest.approx(1e-3)
    assert train.lr_at(1, 9000, 1e-3, 1000, 10_000) == pytest.approx(1e-3)
    # phase 2: constant from the first token
    assert train.lr_at(2, 1, 3e-4, 0, 10_000) == train.lr_at(2, 10_000, 3e-4, 0, 10_000) \
        == pytest.approx(3e-4)
    # phase 3: 1 - sqrt decay to 0.001 x peak: at t/T = 1/4, sqrt = 1/2
    assert train.lr_at(3, 0, 3e-4, 0, 10_000) == pytest.approx(3e-4)
    assert train.lr_at(3, 2500, 3e-4, 0, 10_000) == pytest.approx(3e-4 * (0.001 + 0.999 * 0.5))
    assert train.lr_at(3, 10_000, 3e-4, 0, 10_000) == pytest.approx(3e-7)
    # an overshooting last batch
    assert train.lr_at(3, 12_000, 3e-4, 0, 10_000) == pytest.approx(3e-7)


def test_linear_schedule_hand_picked_points():
    """BERT's shape: warmup over 100 tokens, then a straight line to 0 at the 1000th token."""
    lr = lambda t, phase=1, warmup=100: train.lr_at(phase, t, 1.0, warmup, 1000, "linear")
    assert [lr(50), lr(100), lr(550), lr(1000), lr(1200)] == \
        pytest.approx([0.5, 1.0, 0.5, 0.0, 0.0])
    # later phases: no warmup
    assert [lr(0, 2, 0), lr(250, 2, 0), lr(750, 3, 0)] == pytest.approx([1.0, 0.75, 0.25])


def test_cooldown_schedule_hand_picked_points():
    """wsd-cooldown: phase 1 as wsd until its last 20%, then phase 3's 1 - sqrt decay there:
    over 10,000 tokens the decay starts at 8,000; at 8,500 a quarter of it is done (sqrt 1/2)."""
    lr = lambda t, phase=1: train.lr_at(phase, t, 1.0, 1000, 10_000, "wsd-cooldown")
    assert [lr(500), lr(1000), lr(8000)] == pytest.approx([0.5, 1.0, 1.0])
    assert [lr(8500), lr(10_000), lr(11_000)] == pytest.approx([0.001 + 0.999 * 0.5, 0.001, 0.001])
    # phases 2 and 3 are wsd's
    assert [lr(5000, 2), lr(2500, 3)] == pytest.approx([1.0, 0.001 + 0.999 * 0.5])


def test_phase_defaults_keep_the_papers_relations():
    phase1 = train.RunSettings(**{**vars(train.preset_settings("laptop")), **dict(
        seq_len=256, tokens=1_719_000, lr=8e-4, warmup_tokens=3000, batch_size=32, min_batch_size=8,
        batch_warmup_tokens=5000, micro_batch=8)})
    phase2 = train.derived_settings(2, phase1)
    assert (phase2.seq_len, phase2.tokens, phase2.lr) == (2048, 250_000, pytest.approx(3e-4))
    assert (phase2.batch_size, phase2.min_batch_size, phase2.micro_batch) == (4, 4, 1)
    assert phase2.warmup_tokens == 0
    phase3 = train.derived_settings(3, phase2)
    assert (phase3.seq_len, phase3.tokens, phase3.lr) == (2048, 50_000, pytest.approx(3e-4))


def test_each_preset_continues_at_the_papers_phase_2_and_3_rates():
    """Phase 1's preset settings through the same derivation train.py runs: base continues at
    3e-4 with weight decay 1e-5 (3/8 of 8e-4); large at 5e-5 with weight decay 1e-6 (its 5e-4
    proved too high); the laptop recipe follows base's relation."""
    expected = {"base-24gb": (8e-4, 1e-5, 3e-4, 1e-5), "large-24gb": (5e-4, 1e-5, 5e-5, 1e-6),
                "laptop": (1e-3, 1e-5, 3.75e-4, 1e-5)}
    for preset, (lr1, wd1, lr2, wd2) in expected.items():
        phase1 = train.phase_settings(train.get_args(["--preset", preset]), train.PhaseStart(), 1)
        assert (phase1.lr, phase1.weight_decay) == (lr1, wd1)
        phase2 = train.derived_settings(2, phase1)
        phase3 = train.derived_settings(3, phase2)
        for later in (phase2, phase3):
            assert (later.lr, later.weight_decay) == (pytest.approx(lr2),
                                                      pytest.approx(wd2)), preset


def test_batch_size_warmup_sizes():
    # 2 -> 8 in steps of 2 over 300 tokens, by hand: sizes 2, 4, 6 sum to 12, so each is held for
    # tokens in proportion to its size: 2 for 300 * 2/12 = 50 tokens, 4 for 100, 6 for 150
    # (thresholds at 50, 150, 300), then 8. With rows of L tokens that is 50 / 2L = 100 / 4L =
    # 150 / 6L steps at every size, as the official packer does it.
    sizes = [train.batch_size_at(t, 2, 8, 2, 300) for t in (0, 49, 50, 149, 150, 299, 300, 10_000)]
    assert sizes == [2, 2, 4, 4, 6, 6, 8, 8]
    assert train.batch_size_at(0, 8, 8, 2, 300) == 8


def test_batch_size_warmup_gives_base_equal_steps_per_size():
    """ModernBERT-base's warmup, 768 -> 4608 sequences of 1024 tokens over 50B tokens, one
    micro-batch (96) per GPU on 8 GPUs at a time: 50e9 / (1024 * (768 + 1536 + 2304 + 3072 + 3840))
    = 4238.5 steps at each size below 4608 (equal tokens per size would give 12,716 at 768)."""
    tokens, steps = 0, {}
    while 4608 not in steps:  # through the warmup, and one step at the full size
        size = train.batch_size_at(tokens, 768, 4608, 768, 50e9)
        steps[size] = steps.get(size, 0) + 1
        tokens += size * 1024
    assert sorted(steps) == [768, 1536, 2304, 3072, 3840, 4608]
    for size in (768, 1536, 2304, 3072, 3840):
        assert abs(steps[size] - 50e9 / (1024 * 11520)) <= 1, (size, steps[size])


def test_batch_warmup_and_token_accounting_in_a_run(tmp_path, write_data, log_of):
    # Every document exactly one row long, so a step of b sequences is exactly 32 b tokens.
    data = write_data(tmp_path / "data", [32] * 50)
    out = tmp_path / "out"
    train.main(tiny_args(data, out, "--min_batch_size", "2", "--batch_size", "6",
                         "--batch_warmup_tokens", "192", "--warmup_tokens", "320", "--lr", "1e-3",
                         "--max_steps", "5"))
    steps = [r for r in log_of(out, 1) if "loss" in r]
    # by hand: sizes 2 and 4 held for 192 * 2/6 = 64 and 192 * 4/6 = 128 tokens (one step each):
    # t=0 -> 2, 64 -> 4, 192 -> 6, 384 -> 6, 576 -> 6
    assert [r["batch_size"] for r in steps] == [2, 4, 6, 6, 6]
    assert [r["tokens"] for r in steps] == [64, 192, 384, 576, 768]
    # the LR counts tokens (read once the step's batch is in): 1e-3 x min(1, t / 320)
    assert [r["lr"] for r in steps] == pytest.approx([2e-4, 6e-4, 1e-3, 1e-3, 1e-3])


# ----------------------------------------------------------------------------- masking, packing

def test_masking_statistics():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 320, 300_000)
    ids[rng.random(len(ids)) < 0.2] = rng.choice([0, 1, 2], 1)[0]  # plenty of [CLS]/[SEP]/[PAD]
    special, ordinary = train.special_and_ordinary_ids({"vocab_size": 320,
                                                        "tokenizer_vocab_size": 320, "cls_id": 0,
                                                        "sep_id": 1, "pad_id": 2, "mask_id": 3,
                                                        "unk_id": 4})
    inputs, labels = train.mask_tokens(ids, np.random.default_rng(1), 0.3, 3, special, ordinary)
    is_special = ids < 5
    selected = labels != -100
    assert not (selected & is_special).any()
    assert (inputs[is_special] == ids[is_special]).all() and \
        (inputs[~selected] == ids[~selected]).all()
    assert (labels[selected] == ids[selected]).all()
    assert selected.sum() / (~is_special).sum() == pytest.approx(0.3, abs=0.005)
    chosen, original = inputs[selected], ids[selected]
    assert (chosen == 3).mean() == pytest.approx(0.8, abs=0.01)
    swapped = (chosen != 3) & (chosen != original)
    assert swapped.mean() == pytest.approx(0.1 * (1 - 1 / len(ordinary)), abs=0.01)
    assert (chosen == original).mean() == pytest.approx(0.1 + 0.1 / len(ordinary), abs=0.01)
    # random tokens are ordinary ones
    assert (chosen[swapped] >= 5).all() and (chosen[swapped] < 320).all()
    _, labels15 = train.mask_tokens(ids, np.random.default_rng(2), 0.15, 3, special, ordinary)
    assert (labels15 != -100).sum() / (~is_special).sum() == pytest.approx(0.15, abs=0.005)


def test_packing_keeps_every_token_once_and_reports_efficiency():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 500)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    seq_len = 64
    pieces = train.document_pieces(offsets, seq_len)
    rows, efficiency = train.pack(pieces, seq_len)
    for start, n in pieces:  # a piece never crosses a document boundary, nor exceeds a row
        doc = np.searchsorted(offsets, start, side="right") - 1
        assert 0 < n <= seq_len and start + n <= offsets[doc + 1]
    covered = np.sort(np.concatenate([np.arange(s, s + n) for row in rows for s, n in row]))
    assert np.array_equal(covered, np.arange(offsets[-1]))  # every token exactly once
    assert all(sum(n for _, n in row) <= seq_len for row in rows)
    assert efficiency == pytest.approx(offsets[-1] / (len(rows) * seq_len))
    assert efficiency >= 0.99
    # a batch: the stream is the rows' pieces back to back, cu_seqlens their boundaries
    tokens = np.arange(offsets[-1]) % 1000
    batch_rows = rows[:3]
    ids, cu_seqlens, _ = train.to_device([train.gather(tokens, r) for r in batch_rows],
                                         [train.gather(tokens, r) for r in batch_rows],
                                         batch_rows, "cpu")
    expected = [tokens[s:s + n] for r in batch_rows for s, n in r]
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == \
        np.concatenate([[0], np.cumsum([len(e) for e in expected])]).tolist()
    assert np.array_equal(ids.numpy(), np.concatenate(expected))


def test_real_corpus_packs_above_99_percent(stdlib_data):
    _, offsets = train.load_split(stdlib_data, "train")
    for seq_len in (256, 2048):
        assert train.pack(train.document_pieces(offsets, seq_len), seq_len)[1] >= 0.99


def test_eval_set_is_fixed_across_row_lengths(data):
    meta = train.load_meta(data)
    sets = []
    for seq_len in (16, 64):
        batches = train.eval_batches(data, meta, seq_len, 128, 2, 0, 1, "cpu")
        ids = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[2] for b in batches])
        assert len(ids) == 128
        sets.append(sorted(zip(ids[labels != -100].tolist(), labels[labels != -100].tolist())))
    assert sets[0] == sets[1] and len(sets[0]) > 0


def test_tune_set_takes_the_next_documents_and_none_of_the_eval_sets():
    """Hand-worked: documents of 10, 20, 5 and 25 tokens taken in the order 3, 0, 2, 1. The eval
    set's 30 tokens are all of document 3 and the first 5 of document 0; the tune set starts after
    them, at document 2, and never reuses the rest of document 0."""
    offsets = np.array([0, 10, 30, 35, 60])
    docs, rest = train.first_tokens(np.array([3, 0, 2, 1]), offsets, 30)
    assert docs == [(35, 60), (0, 5)] and rest.tolist() == [2, 1]
    tune, left = train.first_tokens(rest, offsets, 30)
    assert tune == [(30, 35), (10, 30)] and len(left) == 0  # val ran out: 25 tokens, not 30


def test_tune_set_as_large_as_the_eval_set_and_refused_when_val_is_used_up(data):
    meta = train.load_meta(data)  # val: documents of 40, 50 and 60 tokens
    tokens = lambda b: sum(len(ids) for ids, _, _ in b)
    assert tokens(train.eval_batches(data, meta, 16, 50, 2, 0, 1, "cpu", tune=True)) == 50
    with pytest.raises(ValueError, match="no documents beyond"):
        train.eval_batches(data, meta, 16, 150, 2, 0, 1, "cpu", tune=True)


def test_train_data_crosses_epochs_with_a_new_order_and_new_masks(tmp_path, write_data):
    """Seven rows, taken three at a time for 18 rows: every row exactly once in each of epochs 0
    and 1, then 4 rows of epoch 2; each epoch in a different order; the same rows however the
    takes are split and for a second TrainData with the same seed; and a row's mask in epoch 1
    differs from its mask in epoch 0 (the same, drawn again, in the same epoch)."""
    path = write_data(tmp_path / "data", [30] * 7)  # 30 tokens each: one document per 32-token row
    meta = train.load_meta(path)
    data = train.TrainData(path, meta, 32, seed=5, phase=1, mask_rate=0.3)
    assert len(data.rows) == 7
    keys, position = [], [0, 0]
    for _ in range(6):
        taken, position = data.next_rows(position, 3)
        keys += taken
    assert position == [2, 4]
    assert [epoch for epoch, _ in keys] == [0] * 7 + [1] * 7 + [2] * 4
    orders = [[i for epoch, i in keys if epoch == e] for e in range(3)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(7))  # every row once per epoch
    assert orders[0] != orders[1] and orders[0][:4] != orders[2] and orders[1][:4] != orders[2]
    again = train.TrainData(path, meta, 32, seed=5, phase=1, mask_rate=0.3)
    assert again.next_rows([0, 0], 18) == (keys, [2, 4])
    for row in range(7):
        labels = [data.batch([(epoch, row)], "cpu")[2] for epoch in (0, 1, 0)]
        assert not torch.equal(labels[0], labels[1]) and torch.equal(labels[0], labels[2]), row


def test_eval_set_split_across_ranks_and_masked_at_15_percent(tmp_path, write_data):
    """Two ranks' eval batches hold, together, exactly the one-process eval set's pieces (ids and
    labels), each once; the eval masks 15% of the ordinary tokens (not training's 30%), and of
    those 80% become [MASK]. About 40k val tokens: 15% +- 1% is over 5 standard deviations."""
    path = write_data(tmp_path / "data", [30] * 4, val_lengths=[500] * 80)
    meta = train.load_meta(path)

    def pieces(rank, world):  # this rank's eval set as sorted (ids, labels) tuples, one per piece
        out = []
        for ids, cu_seqlens, labels in train.eval_batches(path, meta, 64, 40_000, 4, rank, world,
                                                          "cpu"):
            for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
                out.append((tuple(ids[a:b].tolist()), tuple(labels[a:b].tolist())))
        return out

    one = pieces(0, 1)
    rank0, rank1 = pieces(0, 2), pieces(1, 2)
    assert len(rank0) > 0 and len(rank1) > 0
    assert sorted(rank0 + rank1) == sorted(one)
    ids = np.concatenate([p[0] for p in one])
    labels = np.concatenate([p[1] for p in one])
    assert len(ids) == 40_000
    ordinary = (labels != -100) | (ids >= 5)  # write_data's specials are ids 0..4
    selected = labels != -100
    assert selected.sum() / ordinary.sum() == pytest.approx(0.15, abs=0.01)
    assert (ids[selected] == meta["mask_id"]).mean() == pytest.approx(0.8, abs=0.03)


# ----------------------------------------------------------------------------- optimizer

def optimi_stableadamw_step(p, g, state, lr, max_lr, weight_decay, beta1=0.9, beta2=0.98, eps=1e-6):
    """One step of optimi's StableAdamW on one tensor, transcribed from optimi/stableadamw.py
    (_single_param_stableadamw, decouple_lr=True) and optimi/utils.py (debias_beta). Returns
    (new p, whether the update was clipped). state: dict of step, exp_avg, exp_avg_sq."""
    state["step"] = t = state.get("step", 0) + 1
    # Adam's bias correction, in beta
    debias_beta = lambda beta: (beta ** t - beta) / (beta ** t - 1)
    beta1_hat, beta2_hat = debias_beta(beta1), debias_beta(beta2)
    exp_avg = state["exp_avg"] = state.get("exp_avg", torch.zeros_like(p)).lerp(g, 1 - beta1_hat)
    exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(p)) * beta2_hat + (1 - beta2_hat) * g * g
    state["exp_avg_sq"] = exp_avg_sq
    rms = float((g ** 2 / exp_avg_sq.clamp(min=eps ** 2)).mean().sqrt())  # per tensor
    clipped_lr = lr / max(1.0, rms)
    # decayed with the clipped lr, as optimi does
    p = p * (1 - (clipped_lr / max_lr) * weight_decay)
    return p - clipped_lr * exp_avg / (exp_avg_sq.sqrt() + eps), rms > 1


def test_stable_adamw_matches_optimi_per_tensor_clipping():
    """Several tensors of very different gradient scales in ONE group (plus a no-decay group),
    four steps with a changing LR: every tensor follows optimi's StableAdamW, and at the steps
    where one tensor's gradient spikes only that tensor's update is clipped (clipping is per
    tensor, not pooled over the group). Step 1 never clips (v_hat = g^2 there), hence the spikes."""
    torch.manual_seed(0)
    shapes = {"a": (4, 5), "b": (3,), "c": (2, 6), "d": (6,)}
    scales = {"a": 1.0, "b": 1e-3, "c": 30.0, "d": 0.1}
    spikes = {2: "a", 4: "c"}  # step -> the one tensor whose gradient jumps 100x
    start = {k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = train.StableAdamW([{"params": [params[k] for k in "abc"], "weight_decay": 0.05},
                             {"params": [params["d"]], "weight_decay": 0.0}], lr=0.1)
    for group in opt.param_groups:
        group["max_lr"] = 0.2
    ref, states, clipped = dict(start), {k: {} for k in shapes}, []
    directions = {k: torch.randn(s, dtype=torch.float64) * scales[k] for k, s in shapes.items()}
    for step, lr in zip(range(1, 5), [0.1, 0.2, 0.15, 0.05]):
        grads = {}
        for k, s in shapes.items():  # gradients that shrink (never clipped) but for the spikes
            factor = 100.0 if spikes.get(step) == k else 0.8 ** step
            grads[k] = directions[k] * (1 + 0.3 * torch.randn(s, dtype=torch.float64)) * factor
            params[k].grad = grads[k].clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        clipped.append("")
        for k in shapes:
            wd = 0.0 if k == "d" else 0.05
            ref[k], was_clipped = optimi_stableadamw_step(ref[k], grads[k], states[k], lr, 0.2, wd)
            clipped[-1] += k if was_clipped else ""
            torch.testing.assert_close(params[k].detach(), ref[k], rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"tensor {k}, step {step}: {m}")
    assert clipped == ["", "a", "", "c"]  # the case this test is about did happen


def test_adamw_with_clipping_is_berts_step_on_the_accumulated_gradient(data, tmp_path, log_of):
    """--optimizer adamw --grad_clip: one training step of train.py (two micro-batches) against the
    step written out by hand from the same initial weights and batch: the gradient of the whole
    batch scaled to norm 0.05 (a clip this small always bites), then Adam with betas (0.9, 0.999),
    eps 1e-6 and decoupled decay lr * 0.01 on the matrices only."""
    out = tmp_path / "out"
    train.main(tiny_args(data, out, "--optimizer", "adamw", "--grad_clip", "0.05",
                         "--weight_decay", "0.01", "--dropout", "0", "--max_steps", "1",
                         "--min_batch_size", "4"))
    step = [r for r in log_of(out, 1) if "loss" in r][0]
    ckpt = torch.load(out / "phase1" / "ckpt.pt", weights_only=True)
    s = ckpt["run"]
    torch.manual_seed(s["seed"])  # the same initial weights as the run
    model = ModernBERT(Config(**ckpt["config"]))
    meta = train.load_meta(data)
    train_data = train.TrainData(data, meta, s["seq_len"], s["seed"], 1, s["mask_rate"])
    keys, _ = train_data.next_rows([0, 0], 4)
    micro = [train_data.batch(keys[i:i + 2], "cpu") for i in (0, 2)]
    train.forward_backward(model, micro, 1, train.nullcontext)
    grads = {n: p.grad for n, p in model.named_parameters()}
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
    assert step["grad_norm"] == pytest.approx(norm.item(), rel=1e-5) and norm > 0.05
    lr = step["lr"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = grads[name] * 0.05 / norm
            m, v = 0.1 * g, 0.001 * g * g                         # first step: from zero moments
            m_hat, v_hat = m / 0.1, v / 0.001                     # bias correction at t = 1
            decay = 0.01 if p.dim() >= 2 else 0.0
            expected = p * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + 1e-6)
            torch.testing.assert_close(ckpt["model"][name], expected, atol=2e-6, rtol=1e-5,
                                       msg=name)


def test_recipe_and_model_flags_land_in_the_settings_log_and_checkpoint(data, tmp_path, log_of):
    """Each BERT switch: in the run settings (log and checkpoint) or the model config; kept by
    --resume (a different value is refused) and by phase 2; the LR follows the linear shape."""
    out = tmp_path / "out"
    flags = ["--optimizer", "adamw", "--grad_clip", "1", "--schedule", "linear",
             "--dropout_mode", "bert", "--positions", "learned", "--mlp", "gelu", "--bias", "on",
             "--prenorm", "off", "--global_every", "1", "--tokens", "1200",
             "--batch_warmup_tokens", "0", "--min_batch_size", "4"]
    train.main(tiny_args(data, out, *flags, "--max_steps", "3"))
    train.main(tiny_args(data, out, *flags, "--resume"))
    start = log_of(out, 1)[0]
    recipe = dict(optimizer="adamw", beta2=0.999, grad_clip=1.0, schedule="linear",
                  dropout_mode="bert")  # beta2: AdamW's own, BERT's
    ckpt = torch.load(out / "phase1" / "ckpt.pt", weights_only=True)
    for settings in (start["settings"], ckpt["run"]):
        assert {k: settings[k] for k in recipe} == recipe
    model = dict(positions="learned", mlp="gelu", bias=True, prenorm=False, global_every=1,
                 bert_dropout=True)
    assert {k: ckpt["config"][k] for k in model} == model
    assert "exp_avg" in ckpt["optimizer"]["state"][0]  # torch's AdamW, not StableAdamW ("m", "v")
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    steps = [r for r in log_of(out, 1) if "loss" in r]
    assert ckpt["finished"] and all("grad_norm" in r for r in steps)
    assert [r["lr"] for r in steps] == pytest.approx(
        [train.lr_at(1, r["tokens"], 3e-3, 256, 1200, "linear") for r in steps])
    assert steps[-1]["lr"] == 0.0
    with pytest.raises(SystemExit, match="--schedule wsd differs from linear"):
        train.main(tiny_args(data, out, *flags, "--resume", "--schedule", "wsd"))
    train.main(["--data", str(data), "--out", str(out), "--phase", "2", "--device", "cpu",
                "--dtype", "fp32", "--eval_tokens", "128", "--seq_len", "32", "--max_steps", "1"])
    assert {k: log_of(out, 2)[0]["settings"][k] for k in recipe} == recipe
    default = train.phase_settings(train.get_args([]), train.PhaseStart(), 1)
    assert {k: getattr(default, k) for k in recipe} == dict(optimizer="stableadamw", beta2=0.98,
                                                            grad_clip=0.0, schedule="wsd",
                                                            dropout_mode="modernbert")
    adamw_at = train.phase_settings(train.get_args(["--optimizer", "adamw", "--beta2", "0.95"]),
                                    train.PhaseStart(), 1)
    assert (adamw_at.optimizer, adamw_at.beta2) == ("adamw", 0.95)


def test_beta2_reaches_either_optimizer():
    model = ModernBERT(Config(vocab_size=64, n_layers=1, d_model=16, n_heads=2, d_ff=16, window=4))
    for kind, beta2, betas in [("stableadamw", None, (0.9, 0.98)), ("adamw", None, (0.9, 0.999)),
                               ("stableadamw", 0.999, (0.9, 0.999)), ("adamw", 0.98, (0.9, 0.98))]:
        opt = train.make_optimizer(model, 1e-3, 1e-5, kind, beta2)
        assert all(g["betas"] == betas for g in opt.param_groups), (kind, beta2)


def test_weight_decay_groups():
    model = ModernBERT(Config(vocab_size=64, n_layers=1, d_model=16, n_heads=2, d_ff=16, window=4))
    opt = train.make_optimizer(model, 1e-3, 1e-5)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.tok_embeddings.weight) in decayed and \
        id(model.layers[0].attn.Wqkv.weight) in decayed
    assert id(model.decoder.bias) not in decayed and id(model.final_norm.weight) not in decayed
    assert opt.param_groups[1]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- tiling

def official_layer_map(old_layers, new_layers):
    """The official depth mapping, transcribed from AnswerDotAI/ModernBERT src/bert_layers/model.py
    (init_model_from_pretrained): Python's round, so exact halves go to the even layer."""
    return [round(i * old_layers / new_layers) for i in range(new_layers)]


def test_layer_map_hand_worked():
    """layer_map against the official mapping for several depths, ties included, and by hand."""
    for old, new in [(22, 28), (2, 3), (2, 4), (6, 8), (4, 4), (3, 6), (1, 5), (10, 12), (22, 44)]:
        assert train.layer_map(old, new) == official_layer_map(old, new), (old, new)
    assert train.layer_map(22, 28) == [0, 1, 2, 2, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12, 13, 13,
                                       14, 15, 16, 16, 17, 18, 19, 20, 20, 21]
    assert train.layer_map(2, 3) == [0, 1, 1]  # 2/3 -> 1, 4/3 -> 1
    # ties: 2 -> 4 is 0, 0.5, 1, 1.5 -> 0, 0, 1, 2 (halves to even);
    # 6 -> 8 has 1.5 -> 2 and 4.5 -> 4
    assert train.layer_map(2, 4) == [0, 0, 1, 2]
    assert train.layer_map(6, 8) == [0, 1, 2, 2, 3, 4, 4, 5]


def official_tile(old, shape):
    """The official "tile_weights_from_middle", transcribed as plain loops from
    AnswerDotAI/ModernBERT src/bert_layers/initialization.py (_tile_1d, _tile_2d): the old tensor at
    offset (new - old) // 2, the slots left of it filled walking leftwards from its last element,
    those right of it walking rightwards from its first; a matrix's columns first, then its rows."""
    if old.dim() == 1:
        n_old, n_new = len(old), shape[0]
        offset = (n_new - n_old) // 2
        out = torch.zeros(n_new, dtype=old.dtype)
        out[offset:offset + n_old] = old
        for i in range(offset):                   # leftwards: old[-1], old[-2], ...
            out[offset - 1 - i] = old[n_old - 1 - i % n_old]
        for i in range(offset + n_old, n_new):     # rightwards: old[0], old[1], ...
            out[i] = old[(i - offset) % n_old]
        return out
    (rows_old, cols_old), (rows_new, cols_new) = old.shape, shape
    wide = torch.stack([official_tile(row, (cols_new,)) for row in old])  # (rows_old, cols_new)
    return torch.stack([official_tile(wide[:, j], (rows_new,)) for j in range(cols_new)], dim=1)


def test_center_tile_hand_worked():
    a, b, c = 1.0, 2.0, 3.0
    # 3 -> 7: offset 2; right of the copy wraps from its start, left of it from its end
    assert train.center_tile(torch.tensor([a, b, c]), (7,)).tolist() == [b, c, a, b, c, a, b]
    # 2x2 -> 3x4: rows offset 0 (row 2 wraps to row 0), columns offset 1
    old = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert train.center_tile(old, (3, 4)).tolist() == [[2, 1, 2, 1], [4, 3, 4, 3], [2, 1, 2, 1]]
    with pytest.raises(ValueError):
        train.center_tile(old, (1, 2))


def test_center_tile_matches_the_official_tiling():
    """center_tile against the official loops, for vectors and matrices, odd and even growth, and
    growth past twice the size (the wraparound goes round more than once)."""
    torch.manual_seed(0)
    for old_shape, new_shape in [((3,), (7,)), ((4,), (4,)), ((3,), (11,)), ((2, 3), (5, 8)),
                                 ((3, 2), (3, 9)), ((4, 4), (10, 6)), ((1, 2), (4, 7))]:
        old = torch.randn(old_shape)
        tiled = train.center_tile(old, new_shape)
        assert torch.equal(tiled, official_tile(old, new_shape)), (old_shape, new_shape)


def test_tiling_to_the_same_shape_is_the_identity():
    config = Config(vocab_size=64, n_layers=3, d_model=16, n_heads=2, d_ff=24, window=4)
    old = ModernBERT(config)
    new = ModernBERT(config)
    tiled = train.tile_state_dict(old.state_dict(), config, new)
    for name, tensor in old.state_dict().items():
        assert torch.equal(tiled[name], tensor), name


def test_tiling_splits_fused_tensors_and_maps_layers():
    """tile_state_dict against the official loops: Wqkv tiled as Q, K and V, GeGLU's Wi as its
    input and gate halves, every other tensor whole; new layer i from old layer
    official_layer_map[i]; the vocabulary untouched and the decoder tied."""
    small = Config(vocab_size=64, n_layers=2, d_model=8, n_heads=2, d_ff=8, window=4)
    # d_ff grows by 5
    big = Config(vocab_size=64, n_layers=3, d_model=12, n_heads=3, d_ff=13, window=4)
    old, new = ModernBERT(small), ModernBERT(big)
    with torch.no_grad():  # random norms: init's ones would hide a norm that is not tiled
        for name, p in old.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p))
    state = train.tile_state_dict(old.state_dict(), small, new)
    new.load_state_dict(state)
    o = old.state_dict()
    for new_layer, old_layer in enumerate(official_layer_map(2, 3)):  # [0, 1, 1]
        new_name, old_name = f"layers.{new_layer}.", f"layers.{old_layer}."
        q, k, v = o[old_name + "attn.Wqkv.weight"].chunk(3)                   # (8, 8) each
        qkv = torch.cat([official_tile(t, (12, 12)) for t in (q, k, v)])     # (36, 12)
        assert torch.equal(state[new_name + "attn.Wqkv.weight"], qkv), new_name
        wi, gate = o[old_name + "mlp.Wi.weight"].chunk(2)                     # (8, 8) each
        wi = torch.cat([official_tile(t, (13, 12)) for t in (wi, gate)])     # (26, 12)
        assert torch.equal(state[new_name + "mlp.Wi.weight"], wi), new_name
        for name, shape in [("attn.Wo.weight", (12, 12)), ("mlp.Wo.weight", (12, 13)),
                            ("mlp_norm.weight", (12,))]:
            tiled = official_tile(o[old_name + name], shape)
            assert torch.equal(state[new_name + name], tiled), new_name + name
    norm = official_tile(o["layers.1.attn_norm.weight"], (12,))
    assert torch.equal(state["layers.2.attn_norm.weight"], norm)
    for name in ("embed_norm.weight", "head.norm.weight"):
        assert torch.equal(state[name], official_tile(o[name], (12,))), name
    # the official code leaves it fresh
    assert torch.equal(state["final_norm.weight"], torch.ones(12))
    embedding = official_tile(o["tok_embeddings.weight"], (64, 12))           # vocab untouched
    assert torch.equal(state["tok_embeddings.weight"], embedding)
    assert torch.equal(state["decoder.weight"], embedding)
    assert torch.equal(state["decoder.bias"], o["decoder.bias"])
    assert torch.equal(state["head.dense.weight"], official_tile(o["head.dense.weight"], (12, 12)))
    ids = torch.randint(5, 64, (2, 10))
    assert torch.isfinite(new(ids)[0]).all()


def test_init_from_tiles_a_smaller_checkpoint(data, tmp_path):
    train.main(tiny_args(data, tmp_path / "small", "--max_steps", "1"))
    small = torch.load(tmp_path / "small" / "phase1" / "ckpt.pt", weights_only=True)
    out = tmp_path / "big"
    train.main(tiny_args(data, out, "--n_layers", "4", "--d_model", "96", "--d_ff", "128",
                         "--max_steps", "1", "--lr", "1e-9", "--weight_decay", "0",
                         "--init_from", str(tmp_path / "small" / "phase1" / "ckpt.pt")))
    big = torch.load(out / "phase1" / "ckpt.pt", weights_only=True)
    assert big["config"]["d_model"] == 96 and big["config"]["n_layers"] == 4
    expected = official_tile(small["model"]["tok_embeddings.weight"], (320, 96))
    torch.testing.assert_close(big["model"]["tok_embeddings.weight"], expected, atol=1e-7, rtol=0)


def test_init_from_refuses_a_checkpoint_trained_at_theta_160k(data, tmp_path):
    """Tiling grows a model for phase 1, which runs RoPE at theta 10k everywhere; a phase-2 or 3
    checkpoint's global layers learned theta 160k, so it is refused with the reason."""
    train.main(tiny_args(data, tmp_path / "small", "--max_steps", "1"))
    ckpt = torch.load(tmp_path / "small" / "phase1" / "ckpt.pt", weights_only=True)
    ckpt["config"]["global_theta"], ckpt["phase"] = 160_000.0, 2
    torch.save(ckpt, tmp_path / "phase2.pt")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(data, tmp_path / "big", "--d_model", "96",
                             "--init_from", str(tmp_path / "phase2.pt")))
    assert "phase-1 checkpoint" in one_line_error(e) and "160000" in one_line_error(e)
    assert not (tmp_path / "big").exists()


def test_the_training_step_computes_each_loss_once(monkeypatch):
    """One cross-entropy per micro-batch: the model's own (summed), not a second one beside it
    that would keep another (masked tokens x vocabulary) tensor alive through backward."""
    calls = []
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = ModernBERT(Config(vocab_size=64, n_layers=1, d_model=16, n_heads=2, d_ff=16, window=4))
    rng = np.random.default_rng(0)
    micro = [train.to_device([rng.integers(5, 64, 20)], [rng.integers(5, 64, 20)], [[(0, 20)]],
                             "cpu") for _ in range(3)]
    loss_sum, count = train.forward_backward(model, micro, 1, train.nullcontext)
    assert len(calls) == 3 and count == 60
    logits, _ = model(micro[0][0], cu_seqlens=micro[0][1], labels=micro[0][2])
    assert logits.shape == (20, 64)


def test_bert_model_trains_exports_to_transformers_and_refuses_phase_2(data, tmp_path):
    """--model bert-mini: BERT's parts in train.py's loop; its hf/ is a BERT directory (that
    transformers loads it is test_modernbert's job). Learned positions stop at phase 1's length, so
    phase 2's 8x longer rows are refused with the reason."""
    train.main(tiny_args(data, tmp_path, "--model", "bert-mini", "--n_layers", "2",
                         "--d_model", "64", "--d_ff", "96", "--tokens", "600"))
    assert json.loads((tmp_path / "phase1" / "hf" / "config.json").read_text())["model_type"] \
        == "bert"
    ckpt = torch.load(tmp_path / "phase1" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["positions"] == "learned" and \
        ckpt["model"]["pos_embeddings.weight"].shape == (32, 64)
    with pytest.raises(SystemExit, match="learned positions stop at 32"):
        train.main(["--data", str(data), "--out", str(tmp_path), "--phase", "2", "--device", "cpu",
                    "--dtype", "fp32"])


# ----------------------------------------------------------------------------- resume, DDP

def test_gradient_accumulation_divides_by_the_global_masked_count():
    # Four rows as four micro-batches must give the gradient of one pass over all of them: the
    # mean cross-entropy over every masked token of the batch, not a sum of per-micro-batch means.
    torch.manual_seed(0)
    model = ModernBERT(Config(vocab_size=64, n_layers=2, d_model=32, n_heads=2, d_ff=48, window=8))
    rng = np.random.default_rng(0)
    lengths = [30, 17, 25, 9]
    rows = [[(0, n)] for n in lengths]
    inputs = [rng.integers(5, 64, n) for n in lengths]
    labels = [np.where(rng.random(n) < 0.3, rng.integers(5, 64, n), -100) for n in lengths]
    micro = [train.to_device([i], [l], [r], "cpu") for i, l, r in zip(inputs, labels, rows)]
    loss_sum, count = train.forward_backward(model, micro, 1, train.nullcontext)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ids, cu_seqlens, all_labels = train.to_device(inputs, labels, rows, "cpu")
    logits, _ = model(ids, cu_seqlens=cu_seqlens, labels=all_labels)
    reference = torch.nn.functional.cross_entropy(logits, all_labels[all_labels != -100])
    reference.backward()
    assert count == sum((l != -100).sum() for l in labels)
    assert (loss_sum / count).item() == pytest.approx(reference.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_exact_resume(data, tmp_path, losses):
    # dropout stays on (0.1): its draws must repeat too
    train.main(tiny_args(data, tmp_path / "straight", "--max_steps", "6"))
    train.main(tiny_args(data, tmp_path / "resumed", "--max_steps", "3"))
    train.main(tiny_args(data, tmp_path / "resumed", "--max_steps", "6", "--resume"))
    a = torch.load(tmp_path / "straight" / "phase1" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "phase1" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["tokens"] == b["tokens"] and \
        a["position"] == b["position"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert len(losses(tmp_path / "straight")) == 6


def test_dropout_on_in_training_off_in_eval_and_new_at_every_step(tmp_path, monkeypatch,
                                                                  write_data):
    """Every dropout call, recorded in a 4-step run (dropout 0.1, an eval after steps 2 and 4, each
    step one 64-token micro-batch, so every step's masks have one shape): inside the training
    steps dropout is on at p = 0.1 and drops about 10% (12 masks of 64 x 64), also after an eval;
    in the evals it is off; and a layer's mask is different at every step."""
    data = write_data(tmp_path / "data", [32] * 12)
    calls, in_step = [], [False]
    real_dropout, real_forward_backward = torch.nn.functional.dropout, train.forward_backward

    def dropout(input, p=0.5, training=True, inplace=False):
        out = real_dropout(input, p, training, inplace)
        calls.append((in_step[0], training, p, (out == 0) & (input != 0)))
        return out

    def forward_backward(*args, **kwargs):
        in_step[0] = True
        try:
            return real_forward_backward(*args, **kwargs)
        finally:
            in_step[0] = False

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    monkeypatch.setattr(train, "forward_backward", forward_backward)
    train.main(tiny_args(data, tmp_path / "out", "--batch_size", "2", "--min_batch_size", "2",
                         "--micro_batch", "2", "--dropout", "0.1", "--max_steps", "4",
                         "--eval_every", "2"))
    training = [c for c in calls if c[0]]
    evaluating = [c for c in calls if not c[0]]
    assert len(training) == 4 * 3  # 4 steps x 3 layers of the tiny model
    assert all(on and p == 0.1 for _, on, p, _ in training), [(on, p) for _, on, p, _ in training]
    dropped = torch.stack([mask for *_, mask in training]).float().mean()
    assert 0.09 <= dropped <= 0.11, float(dropped)
    assert evaluating and all(not on and not mask.any() for _, on, _, mask in evaluating), \
        [(on, int(mask.sum())) for _, on, _, mask in evaluating]
    first_layer = [training[3 * step][3] for step in range(4)]
    assert all(first_layer[0].shape == m.shape for m in first_layer)
    for i in range(4):
        for j in range(i):
            assert not torch.equal(first_layer[i], first_layer[j]), (i, j)


def test_bert_dropout_goes_where_bert_put_it(monkeypatch):
    """--dropout_mode bert (Config.bert_dropout): one dropout after the embedding norm, then per
    layer on the attention probabilities (SDPA's dropout_p), the attention output and the MLP
    output, all at p; ModernBERT's mode: the attention output only. Eval mode: none of them, so
    two evals agree exactly, while two training forwards differ."""
    calls = []
    real_dropout, real_sdpa = (torch.nn.functional.dropout,
                               torch.nn.functional.scaled_dot_product_attention)
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda x, p=0.5, training=True, inplace=False:
                        calls.append(("dropout", p, training)) or
                        real_dropout(x, p, training, inplace))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, dropout_p=0.0, **k: calls.append(("probs", dropout_p, True)) or
                        real_sdpa(*a, dropout_p=dropout_p, **k))
    ids = torch.randint(5, 64, (40,))
    # equal lengths: one SDPA call per layer
    cu_seqlens = torch.tensor([0, 20, 40], dtype=torch.int32)
    for bert, expected in [(True, [("dropout", 0.1, True)] + [("probs", 0.1, True),
                                                             ("dropout", 0.1, True),
                                                             ("dropout", 0.1, True)] * 3),
                           (False, [("probs", 0.0, True), ("dropout", 0.1, True)] * 3)]:
        torch.manual_seed(0)
        model = ModernBERT(Config(vocab_size=64, n_layers=3, d_model=32, n_heads=2, d_ff=48,
                                  window=8, attn_out_dropout=0.1, bert_dropout=bert))
        calls.clear()
        a = model.encode(ids, cu_seqlens=cu_seqlens)
        assert calls == expected, (bert, calls)
        b = model.encode(ids, cu_seqlens=cu_seqlens)
        assert not torch.equal(a, b)
        model.eval()
        calls.clear()
        c, d = model.encode(ids, cu_seqlens=cu_seqlens), model.encode(ids, cu_seqlens=cu_seqlens)
        assert torch.equal(c, d) and \
            all(p == 0 or not on for _, p, on in calls if _ == "probs") and \
            all(not on for kind, _, on in calls if kind == "dropout")


def test_later_phases_continue_weights_and_adam_moments(data, tmp_path):
    """Phase 2 and phase 3, stopped before their first step, hold exactly the previous phase's
    final weights and optimizer state (Adam's moments and step counts); a phase-2 step then counts
    on from phase 1's steps."""
    out = tmp_path / "out"
    later = lambda phase, *extra: ["--data", str(data), "--out", str(out), "--phase", str(phase),
                                   "--device", "cpu", "--dtype", "fp32", "--eval_tokens", "128",
                                   *extra]
    train.main(tiny_args(data, out, "--tokens", "600", "--eval_every", "1000"))
    ckpt = lambda phase: torch.load(out / f"phase{phase}" / "ckpt.pt", weights_only=True)

    def assert_continues(before, after):
        assert before["finished"] and after["step"] == 0
        for name, tensor in before["model"].items():
            assert torch.equal(after["model"][name], tensor), name
        assert before["optimizer"]["state"].keys() == after["optimizer"]["state"].keys()
        for index, state in before["optimizer"]["state"].items():
            for key, value in state.items():
                kept = after["optimizer"]["state"][index][key]
                assert torch.equal(torch.as_tensor(kept), torch.as_tensor(value)), (index, key)

    train.main(later(2, "--max_steps", "0"))
    phase1 = ckpt(1)
    assert_continues(phase1, ckpt(2))
    train.main(later(2, "--overwrite"))
    phase2 = ckpt(2)
    assert phase2["finished"] and phase2["step"] >= 1
    steps = {int(state["step"]) for state in phase2["optimizer"]["state"].values()}
    assert steps == {phase1["step"] + phase2["step"]}
    train.main(later(3, "--max_steps", "0"))
    assert_continues(phase2, ckpt(3))


def test_ddp_two_processes_equal_one_with_accumulation(data, tmp_path, log_of, losses):
    """One torchrun launch of 2 processes against one process accumulating 4 micro-batches: the
    same weights and losses; the same Adam moments, which hold the gradients themselves (Adam's
    update is almost blind to a gradient's scale, so a wrong factor in the gradient barely moves
    the weights: the moments show it); and the same val loss and accuracy from the ranks' split
    of the eval set, summed over processes."""
    args = lambda out: tiny_args(data, out, "--batch_size", "4", "--min_batch_size", "4",
                                 "--micro_batch", "1", "--dropout", "0", "--max_steps", "3")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(HERE / "train.py"), *args(tmp_path / "ddp")],
                         cwd=HERE, env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    train.main(args(tmp_path / "single"))  # 4 micro-batches of 1, accumulated
    a = torch.load(tmp_path / "ddp" / "phase1" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "phase1" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    for index, state in b["optimizer"]["state"].items():  # m ~ gradient, v ~ gradient^2
        for key in ("m", "v"):
            ours, ref = a["optimizer"]["state"][index][key], state[key]
            error = float((ours - ref).abs().max() / ref.abs().max())
            assert error <= 1e-5, (index, key, error)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], atol=1e-5, rtol=0)
    for (_, la), (_, lb) in zip(losses(tmp_path / "ddp"), losses(tmp_path / "single")):
        assert la == pytest.approx(lb, abs=1e-5)
    evals = [[(r["val_loss"], r["val_acc"]) for r in log_of(tmp_path / run, 1) if "val_loss" in r]
             for run in ("ddp", "single")]
    assert len(evals[0]) == len(evals[1]) == 1
    (loss_a, acc_a), (loss_b, acc_b) = evals[0][0], evals[1][0]
    assert loss_a == pytest.approx(loss_b, abs=1e-5) and acc_a == acc_b


# ----------------------------------------------------------------------------- bad input, faults

def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must be positive"), (["--lr", "nan"], "--lr must be positive"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--seq_len", "1"], "--seq_len must be at least 16"),
    (["--n_heads", "3"], "d_model 256 is not divisible by n_heads 3"),
    (["--window", "7"], "window 7 must be even"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--mask_rate", "0"], "--mask_rate must be in (0, 1)"),
    (["--weight_decay", "-0.1"], "--weight_decay must be at least 0"),
    (["--tokens", "0"], "--tokens must be"),
    (["--micro_batch", "8", "--batch_size", "4"], "--micro_batch 8 is larger than --batch_size 4"),
    (["--eval_every", "0"], "--eval_every must be at least 1")])
def test_bad_flags_are_one_argparse_error_before_anything_is_read_or_written(
        flags, message, tmp_path, capsys, write_data):
    data = write_data(tmp_path / "data", [40] * 20)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(data), "--out", str(tmp_path / "out"), *flags])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"train.py: error: {message}")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_would_run_code_is_refused(data, tmp_path, crafted_checkpoint):
    """Checkpoints are read with weights_only=True: tensors and plain containers only. A crafted
    file is a one-line error wherever train.py reads one (--resume, --init_from, the previous
    phase), and the code in it never runs."""
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    (out / "phase1").mkdir(parents=True)
    crafted_checkpoint(out / "phase1" / "ckpt.pt", marker)
    for flags in (["--resume"], ["--phase", "2"]):
        with pytest.raises(SystemExit) as e:
            train.main(tiny_args(data, out, *flags))
        assert "is not a model checkpoint, or is corrupted" in one_line_error(e)
    crafted_checkpoint(tmp_path / "small.pt", marker)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(data, tmp_path / "other", "--init_from", str(tmp_path / "small.pt")))
    assert "is not a model checkpoint, or is corrupted" in one_line_error(e)
    assert not marker.exists()


def test_missing_data_says_run_prepare(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert "python prepare.py" in one_line_error(e)


def test_later_phase_names_the_command_to_run_first(data, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(data, tmp_path / "out", "--phase", "2"))
    assert f"python train.py --phase 1 --data {data} --out {tmp_path / 'out'}" in one_line_error(e)


def test_corrupted_or_incompatible_checkpoint_is_refused_and_kept(data, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_args(data, out, "--max_steps", "2"))
    ckpt = out / "phase1" / "ckpt.pt"
    good = ckpt.read_bytes()
    with pytest.raises(SystemExit) as e:  # a setting that differs from the run being resumed
        train.main(tiny_args(data, out, "--max_steps", "4", "--resume", "--lr", "1e-3"))
    assert "--lr" in one_line_error(e)
    with pytest.raises(SystemExit) as e:  # starting over on top of it needs --overwrite
        train.main(tiny_args(data, out))
    assert "--resume" in one_line_error(e)
    assert ckpt.read_bytes() == good
    ckpt.write_bytes(good[: len(good) // 2])  # a truncated file
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(data, out, "--max_steps", "4", "--resume"))
    assert "corrupted" in one_line_error(e)
    assert ckpt.read_bytes() == good[: len(good) // 2]


def test_a_checkpoint_of_another_train_py_version_is_refused_with_what_to_do(data, tmp_path):
    """Run settings are exactly SETTINGS' names: a checkpoint whose settings lack one (written
    before it existed) is not filled in with a guess, it is refused, saying to run again."""
    out = tmp_path / "out"
    train.main(tiny_args(data, out, "--max_steps", "2"))
    ckpt = torch.load(out / "phase1" / "ckpt.pt", weights_only=True)
    assert set(ckpt["run"]) == {s.name for s in train.SETTINGS}
    del ckpt["run"]["schedule"]
    torch.save(ckpt, out / "phase1" / "ckpt.pt")
    for argv in (tiny_args(data, out, "--max_steps", "4", "--resume"),
                 ["--data", str(data), "--out", str(out), "--phase", "2"]):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert "another version of train.py" in one_line_error(e) and \
            "schedule" in one_line_error(e)
    assert not (out / "phase2").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    poisoned = {"on": False}
    real_save, real_ce = train.save_atomic, torch.nn.functional.cross_entropy

    def save_then_poison(path, state):
        real_save(path, state)
        poisoned["on"] = True

    def cross_entropy(*args, **kwargs):
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if poisoned["on"] else loss

    monkeypatch.setattr(train, "save_atomic", save_then_poison)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(data, out, "--ckpt_every", "2"))
    assert "nan" in one_line_error(e)
    ckpt = torch.load(out / "phase1" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_interrupted_save_leaves_the_old_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train.main(tiny_args(data, out, "--max_steps", "2"))
    ckpt = out / "phase1" / "ckpt.pt"
    good = ckpt.read_bytes()

    def interrupted_save(state, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(data, out, "--max_steps", "4", "--resume"))
    assert "interrupted" in one_line_error(e)
    assert ckpt.read_bytes() == good
    assert os.listdir(out / "phase1").count("ckpt.pt.tmp") == 0


# ----------------------------------------------------------------------------- the real corpus

@pytest.fixture(scope="module")
def stdlib_data(tmp_path_factory):
    """The default corpus: data/stdlib if prepared, else built here exactly as `python prepare.py`
    builds it (a clean clone has none), so the test sees the same data everywhere."""
    if (HERE / "data" / "stdlib" / "meta.json").exists():
        return HERE / "data" / "stdlib"
    import prepare
    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare.main(["--out", str(out)])
    return out


def test_smoke_three_phases_on_the_real_corpus(stdlib_data, tmp_path, log_of):
    out = tmp_path / "out"
    common = ["--data", str(stdlib_data), "--out", str(out), "--device", "cpu", "--dtype", "fp32",
              "--eval_tokens", "8192", "--eval_every", "1000"]
    result = train.main(common + ["--model", "tiny", "--seq_len", "128", "--tokens", "80000",
                                  "--lr", "5e-3", "--warmup_tokens", "8000", "--batch_size", "16",
                                  "--min_batch_size", "8", "--batch_warmup_tokens", "8000",
                                  "--micro_batch", "8"])
    log = log_of(out, 1)
    steps = [r["loss"] for r in log if "loss" in r]
    assert result["finished"] and len(steps) >= 30
    assert steps[0] > np.log(train.load_meta(stdlib_data)["vocab_size"]) - 0.5  # chance: ~ln(vocab)
    assert np.mean(steps[-5:]) < steps[0] - 1.5, steps  # and falls clearly
    assert result["val_loss"] < steps[0] - 1.5
    train.main(common + ["--phase", "2"])
    train.main(common + ["--phase", "3"])
    phase1, phase3 = (torch.load(out / f"phase{n}" / "ckpt.pt", weights_only=True) for n in (1, 3))
    assert phase1["config"]["global_theta"] == 10_000 and \
        phase3["config"]["global_theta"] == 160_000
    assert phase3["config"]["local_theta"] == 10_000 and phase3["run"]["seq_len"] == 1024
    # the paper's proportions
    assert phase3["run"]["tokens"] == int(int(80000 * 250 / 1719) * 50 / 250)
    last = [r for r in log_of(out, 3) if "loss" in r][-1]
    assert last["lr"] == pytest.approx(0.001 * phase3["run"]["lr"])
    assert phase3["run"]["lr"] == pytest.approx(5e-3 * 3 / 8)
    hf = ModernBERT.from_pretrained(out / "phase3" / "hf")
    assert (out / "phase3" / "hf" / "tokenizer.json").exists() == \
        (Path(stdlib_data) / "tokenizer.json").exists()
    for name, tensor in phase3["model"].items():
        assert torch.equal(hf.state_dict()[name], tensor), name


def test_a_mixed_model_finishes_its_phase_without_a_transformers_export(data, tmp_path):
    """Pre-norm BERT (an ablate.py rung) has no transformers class: the phase still finishes and
    saves its checkpoint; only hf/ is left out."""
    result = train.main(tiny_args(data, tmp_path, "--model", "bert-mini", "--n_layers", "2",
                                  "--d_model", "64", "--d_ff", "96", "--prenorm", "on",
                                  "--tokens", "600"))
    assert result["finished"] and (tmp_path / "phase1" / "ckpt.pt").exists()
    assert not (tmp_path / "phase1" / "hf").exists()
