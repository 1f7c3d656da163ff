"""Tests of ablate.py: the ladder's flags, a two-rung ladder end to end, the long-range bucketing
and the planted probe. CPU only, tiny models; python -m pytest -q test_ablate.py"""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

import ablate
import train

HERE = Path(__file__).resolve().parent


def run_of(argv):
    """train.py's (run settings, model config) for a phase-1 command line, without running it."""
    args = train.get_args(argv)
    settings = train.phase_settings(args, train.PhaseStart(), 1)
    meta = dict(vocab_size=8192, pad_id=2, cls_id=0, sep_id=1)
    return vars(settings), asdict(train.model_config(args, meta, train.PhaseStart()))


def test_the_ladder_adds_one_change_per_rung_from_bert_to_the_default_run(tmp_path, write_data):
    """At the default budget (6.4M tokens) the top rung is exactly `python train.py --phase 1`;
    the bottom is BERT's parts and recipe; each rung between changes one thing (a change may be
    several flags: the GeGLU MLP comes with its width, the optimizer with its decay's units)."""
    data = write_data(tmp_path / "data", [40] * 10)
    args = ablate.get_args(["--tokens", "6.4e6", "--data", str(data)])

    def rung_run(rung):  # (--data, --out, --dtype: not part of the settings or the model)
        return run_of(ablate.train_command(rung, ablate.FIRST_SEED, args, "fp32")[2:])

    default = run_of([])
    assert rung_run("modernbert") == default
    bert_settings, bert_config = rung_run("bert")
    assert {k: bert_config[k]
            for k in ("positions", "mlp", "bias", "prenorm", "global_every", "d_ff")} == \
        dict(positions="learned", mlp="gelu", bias=True, prenorm=False, global_every=1, d_ff=768)
    assert {k: bert_settings[k] for k in ("mask_rate", "optimizer", "beta2", "grad_clip",
                                          "weight_decay", "schedule", "batch_warmup_tokens",
                                          "dropout_mode")} == \
        dict(mask_rate=0.15, optimizer="adamw", beta2=0.999, grad_clip=1.0, weight_decay=0.01,
             schedule="linear", batch_warmup_tokens=0, dropout_mode="bert")
    runs = [rung_run(rung) for rung in ablate.LADDER]
    for (name, *_), before, after in zip(ablate.CHANGES, runs, runs[1:]):
        changed = {k for part in (0, 1) for k in before[part] if before[part][k] != after[part][k]}
        expected = {"prenorm": {"prenorm"}, "no_bias": {"bias"}, "geglu": {"mlp", "d_ff"},
                    "rope": {"positions"}, "alternating": {"global_every"}, "mask30": {"mask_rate"},
                    "stableadamw": {"optimizer", "weight_decay"}, "beta2": {"beta2"},
                    "no_clip": {"grad_clip"}, "wsd": {"schedule"},
                    "batch_warmup": {"batch_warmup_tokens"},
                    "dropout": {"dropout_mode"}}[name]
        assert changed == expected, name
    # leave-one-out: ModernBERT with just that change back at BERT's
    loo_settings, _ = rung_run("modernbert-wsd")
    assert loo_settings == dict(default[0], schedule="linear")
    loo_settings, _ = rung_run("modernbert-stableadamw")  # AdamW at ModernBERT's beta2 0.98
    assert loo_settings == dict(default[0], optimizer="adamw", weight_decay=0.01)
    assert loo_settings["beta2"] == 0.98
    # a variant: ModernBERT with one thing added, here phase 1's own cooldown
    variant_settings, variant_config = rung_run("modernbert+cooldown")
    assert variant_settings == dict(default[0], schedule="wsd-cooldown")
    assert variant_config == default[1]
    # and fixed sinusoids in RoPE's place: the model's positions only, the recipe ModernBERT's
    variant_settings, variant_config = rung_run("modernbert+sinusoidal")
    assert variant_settings == default[0]
    assert variant_config == dict(default[1], positions="sinusoidal")


def test_a_run_directory_is_the_same_run_whatever_the_order_of_its_flags():
    assert ablate.same_flags(["--lr", "1e-3", "--seed", "1"], ["--seed", "1", "--lr", "1e-3"])
    assert not ablate.same_flags(["--lr", "1e-3", "--seed", "1"], ["--lr", "1", "--seed", "1e-3"])
    assert not ablate.same_flags(["--lr", "1e-3"], ["--lr", "1e-3", "--seed", "1"])


@pytest.mark.parametrize("flags, message", [
    (["--rungs", "bert,gpt"], "unknown rung 'gpt'"),
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--lr_grid", "0,1e-3"], "--lr_grid must hold positive LRs"),
    (["--lr_grid", "fast"], "argument --lr_grid: invalid grid value: 'fast'"),
    (["--warmup_grid", "0.1,1.5"], "--warmup_grid must hold shares of the budget in [0, 1)"),
    (["--lr_grid", "gpt=1e-3"], "--lr_grid gpt=: 'gpt' is not in --rungs"),
    (["--rungs", "bert", "--lr_grid", "bert="], "--lr_grid bert= must hold positive LRs, got []"),
    (["--data", "nowhere"], "no prepared data in nowhere/")])
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys, write_data):
    data = write_data(tmp_path / "data", [40] * 10)
    with pytest.raises(SystemExit) as e:
        ablate.main(["--data", str(data), "--out", str(tmp_path / "out"), *flags])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"ablate.py: error: {message}")
    assert not (tmp_path / "out").exists()


def test_a_two_rung_ladder_end_to_end(tmp_path, write_data, log_of):
    """Two rungs, two seeds each, on a tiny model and budget, two at a time: the table, the JSON
    and the plot; the table's numbers are the logs' last evals; a second call reuses them all."""
    data = write_data(tmp_path / "data", np.random.default_rng(1).integers(5, 90, 200).tolist())
    out = tmp_path / "ablate"
    cmd = [sys.executable, str(HERE / "ablate.py"), "--data", str(data), "--out", str(out),
           "--rungs", "bert,modernbert", "--tokens", "1500", "--seeds", "2", "--dtype", "fp32",
           "--", "--model", "tiny", "--seq_len", "32", "--batch_size", "4", "--micro_batch", "2",
           "--eval_tokens", "128", "--eval_every", "4", "--d_ff", "64"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    table = (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert (out / "val_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rung, seed in [("bert", 1337), ("modernbert", 1337), ("bert", 1338), ("modernbert", 1338)]:
        run_dir = out / (rung if seed == 1337 else f"{rung}-seed{seed}")
        last = [r for r in log_of(run_dir, 1) if "val_acc" in r][-1]
        assert results["runs"][f"{rung}@{seed}"]["val_acc"] == last["val_acc"]
        assert log_of(run_dir, 1)[0]["settings"]["seed"] == seed
    for rung in ("bert", "modernbert"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {rung} |"))
        assert f"{results['runs'][f'{rung}@1337']['val_acc']:.2%}" in row
    assert "Seed-to-seed spread (2 seeds" in table
    spread = [line for line in table.split("Seed-to-seed")[1].splitlines() if line.startswith("| ")]
    for rung in ("bert", "modernbert"):
        row = next(line for line in spread if line.startswith(f"| {rung} |"))
        runs = [results["runs"][f"{rung}@{seed}"] for seed in (1337, 1338)]
        assert ", ".join(f"{r['val_acc']:.2%}" for r in runs) in row
        assert ", ".join(f"{r['val_loss']:.3f}" for r in runs) in row
    bert_log = log_of(out / "bert", 1)
    assert bert_log[0]["settings"]["optimizer"] == "adamw" and \
        bert_log[0]["config"]["positions"] == "learned"
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reused") == 4, again.stdout
    # Other flags into the same --out: an error, not the old runs' numbers under new flags.
    other = [("1600" if part == "1500" else part) for part in cmd]
    clash = subprocess.run(other, capture_output=True, text=True, env=env, timeout=300)
    assert clash.returncode == 1 and "holds a run with other flags" in clash.stdout
    assert clash.stderr.strip().splitlines()[-1].startswith("ablate.py: error: 4 run(s) failed")
    assert results == json.loads((out / "results.json").read_text())


def test_a_tuned_ladder_chooses_on_tune_and_runs_every_rung_at_its_choice(tmp_path, write_data,
                                                                           log_of):
    """--lr_grid: each rung's grid (modernbert's its own) runs score val's tune slice; the chosen
    point is the grid's best tune accuracy; every rung then runs at its own choice on 2 seeds,
    scored on val; the grid, the choice, the seeds' interval and Welch's t reach results.json
    and the table."""
    data = write_data(tmp_path / "data", np.random.default_rng(2).integers(5, 90, 200).tolist(),
                      val_lengths=[40] * 6)  # 64 tokens for the eval set, more for tune
    out = tmp_path / "ablate"
    cmd = [sys.executable, str(HERE / "ablate.py"), "--data", str(data), "--out", str(out),
           "--rungs", "bert,modernbert,modernbert-wsd", "--tokens", "1000", "--seeds", "2",
           "--dtype", "fp32", "--lr_grid", "1e-4,1e-2", "--lr_grid", "modernbert=1e-3,1e-2",
           "--lr_grid", "modernbert-wsd=3e-3",
           "--warmup_grid", "0.1", "--",
           "--model", "tiny", "--seq_len", "32", "--batch_size", "4", "--micro_batch", "2",
           "--eval_tokens", "64", "--eval_every", "4", "--d_ff", "64"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    for rung, lrs in [("bert", [1e-4, 1e-2]), ("modernbert", [1e-3, 1e-2])]:
        grid = results["grid"][rung]
        assert [(p["lr"], p["warmup"]) for p in grid] == [(lr, 0.1) for lr in lrs]
        for p in grid:
            log = log_of(out / "grid" / f"{rung}-lr{p['lr']:g}-warmup0.1", 1)
            assert log[0]["eval_set"] == "tune" and log[0]["settings"]["lr"] == p["lr"]
            assert log[0]["settings"]["warmup_tokens"] == 100
            assert p["val_acc"] == [r for r in log if "val_acc" in r][-1]["val_acc"]
        best = max(grid, key=lambda p: (p["val_acc"], -p["val_loss"]))
        assert results["chosen"][rung] == {"lr": best["lr"], "warmup": 0.1}
        accs = []
        for seed, run_dir in [(1337, out / rung), (1338, out / f"{rung}-seed1338")]:
            start = log_of(run_dir, 1)[0]
            assert (start["eval_set"], start["settings"]["lr"], start["settings"]["seed"]) == \
                ("val", best["lr"], seed)
            accs.append(results["runs"][f"{rung}@{seed}"]["val_acc"] * 100)
        row = next(line for line in table.split("Seed-to-seed")[1].splitlines()
                   if line.startswith(f"| {rung} |"))
        half = 12.706 * np.std(accs, ddof=1) / np.sqrt(2)  # t(0.975, 1 degree of freedom)
        assert f"{np.mean(accs) - half:.2f}-{np.mean(accs) + half:.2f}%" in row
    assert "| bert -> modernbert |" in table and "1e-02 |" not in table
    assert sum(line.endswith("%* |") for line in table.splitlines()) == 2  # one choice per rung
    # a one-point grid is taken as given: no grid runs, both seeds at it, against modernbert
    assert results["chosen"]["modernbert-wsd"] == {"lr": 3e-3, "warmup": 0.1}
    assert "modernbert-wsd" not in results["grid"]
    assert not list((out / "grid").glob("modernbert-wsd*"))
    assert [log_of(out / d, 1)[0]["settings"]["lr"] for d in
            ("modernbert-wsd", "modernbert-wsd-seed1338")] == [3e-3, 3e-3]
    assert "| modernbert -> modernbert-wsd |" in table
    assert "0.003, 0.1 of the budget (given)" in table


def test_the_threshold_column_and_the_compared_pairs():
    assert ablate.to_threshold({"curve": [(1e5, 0.04), (2e5, 0.25), (3e5, 0.19)]}) == "0.20M"
    assert ablate.to_threshold({"curve": [(1e5, 0.04), (2e5, 0.19)]}) == "never"
    assert ablate.compared_pairs(["bert", "prenorm", "modernbert", "modernbert-rope",
                                  "modernbert-wsd"]) == \
        [("bert", "prenorm"), ("prenorm", "modernbert"), ("modernbert", "modernbert-rope"),
         ("modernbert", "modernbert-wsd")]
    # a variant: against modernbert and the rung it is there for, whichever are in the table
    assert ablate.compared_pairs(["modernbert", "modernbert-wsd", "modernbert+cooldown"]) == \
        [("modernbert", "modernbert-wsd"), ("modernbert", "modernbert+cooldown"),
         ("modernbert-wsd", "modernbert+cooldown")]
    assert ablate.compared_pairs(["modernbert-wsd", "modernbert+cooldown"]) == \
        [("modernbert-wsd", "modernbert+cooldown")]
    assert ablate.compared_pairs(["modernbert", "modernbert-rope", "modernbert+sinusoidal"]) == \
        [("modernbert", "modernbert-rope"), ("modernbert", "modernbert+sinusoidal"),
         ("modernbert-rope", "modernbert+sinusoidal")]


def test_the_seed_band_pairs_evals_whose_token_counts_differ_by_a_few():
    # seeds pack other documents into their rows, so eval i lands a few tokens apart per seed
    curves = [np.array([[1000, 0.1], [2003, 0.3]]), np.array([[1002, 0.2], [2001, 0.5]]),
              np.array([[1001, 0.3], [2002, 0.1]])]
    tokens, mean, low, high = ablate.seed_band(curves)
    np.testing.assert_allclose(tokens, [1001, 2002])
    np.testing.assert_allclose(mean, [0.2, 0.3])
    np.testing.assert_allclose(low, [0.1, 0.1])
    np.testing.assert_allclose(high, [0.3, 0.5])
    assert ablate.seed_band(curves[:1]) is None                     # one seed: a line, no band
    assert ablate.seed_band([curves[0], curves[1][:1]]) is None     # a run cut short


# ----------------------------------------------------------------------------- long range

def test_previous_occurrence_distances_by_hand():
    #          a  b  a  c  b  b  a
    ids = [7, 8, 7, 9, 8, 8, 7]
    # a: first, b: first, a: 2 back, c: first, b: 3 back, b: 1 back, a: 4 back
    assert ablate.previous_distances(ids).tolist() == [0, 0, 2, 0, 3, 1, 4]
    assert ablate.bucket_of([1, 64, 65, 256, 257, 1024, 1025, 9000, 0]).tolist() == \
        [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert ablate.BUCKETS[4] == "first"


def test_repeats_by_hand():
    #        0  1 ... 39 40 ... 79 ... 139
    tokens = np.full(140, 5)
    tokens[40], tokens[80] = 7, 7    # 40 apart: a repeat
    tokens[100], tokens[110] = 8, 8  # 10 apart: too close
    tokens[120] = 9
    assert ablate.repeats(tokens, [(0, 140)], np.array([7, 8, 9])) == [(40, 80)]
    tokens[10] = 7                   # another occurrence within 64 of the first: not clean
    assert ablate.repeats(tokens, [(0, 140)], np.array([7, 8, 9])) == []
    assert ablate.repeats(tokens, [(0, 100)], np.array([7])) == []  # 80 + 32 is past the end


def test_pulled_apart_rows_put_each_use_d_after_its_only_definition(tmp_path, write_data):
    data = write_data(tmp_path / "data", [40] * 10, val_lengths=(50, 4300, 3000), vocab=2000)
    meta = train.load_meta(data)
    distances = [32, 128, 512, 4096]
    rows, row_distances = ablate.planted_rows(data, meta, 16, distances, seed=1)
    controls, control_distances = ablate.planted_rows(data, meta, 16, distances, seed=1,
                                                      define=False)
    # the same repeats at each d
    assert sorted(np.concatenate(row_distances).tolist()) == sorted(distances * 16)
    for (ids, labels), dist in zip(rows, row_distances):
        for position, d in zip(np.flatnonzero(labels != -100), dist):
            assert ids[position] == meta["mask_id"]
            # X: only d back
            assert np.flatnonzero(ids == labels[position]).tolist() == [position - d]
    for (ids, labels), _ in zip(controls, control_distances):
        assert not np.isin(labels[labels != -100], ids).any()  # never in the row


def test_long_range_end_to_end_on_a_tiny_run(tmp_path, write_data):
    """A tiny model's three phases, then --long_range on them: the tables, their counts (every
    masked token of the long documents lands in exactly one bucket), and the plot."""
    data = write_data(tmp_path / "data", np.random.default_rng(1).integers(5, 90, 200).tolist(),
                      val_lengths=(50, 2100, 4300), vocab=20000)  # (room for planted ids)
    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--device", "cpu", "--dtype", "fp32",
              "--eval_tokens", "128"]
    train.main(common + ["--model", "tiny", "--seq_len", "32", "--tokens", "2000",
                         "--batch_size", "4", "--min_batch_size", "4", "--micro_batch", "2"])
    train.main(common + ["--phase", "2"])
    train.main(common + ["--phase", "3"])
    out = tmp_path / "lr"
    ablate.main(["--long_range", "--run", str(run), "--data", str(data), "--out", str(out),
                 "--probe_pairs", "8", "--dtype", "fp32"])
    results = json.loads((out / "long_range.json").read_text())
    tokens, _ = train.load_split(data, "val")
    _, labels = train.mask_tokens(tokens.astype(np.int64), np.random.default_rng(train.EVAL_SEED),
                                  0.15, 3, *train.special_and_ordinary_ids(train.load_meta(data)))
    # the two long documents' masked tokens, as eval masks them
    masked = (labels[50:] != -100).sum()
    for key, sums in results["buckets"].items():
        assert sum(n for _, n in sums) == masked, key
        assert all(0 <= c <= n for c, n in sums)
    by_length = {row_len: results["buckets"][f"1@{row_len}"] for row_len in ablate.ROW_LENGTHS}
    assert by_length[2048][4][1] > by_length[8192][4][1]  # shorter rows: more first occurrences
    for phase in ("1", "2", "3"):
        counts = [results["planted"][phase][str(d)][1] for d in ablate.PROBE_DISTANCES]
        assert len(set(counts)) == 1 and 0 < counts[0] <= 8, counts  # the same repeats at every d
    for phase in ("1", "2", "3"):  # each use's hit, in the same order: they sum to the counts
        for d in ablate.PROBE_DISTANCES:
            hits = results["planted_hits"][phase][str(d)]
            assert [sum(hits), len(hits)] == results["planted"][phase][str(d)]
    report = (out / "long_range.md").read_text()
    assert "| 3 | 8,192 |" in report and "| 1 -> 2 | +" in report and "| 2 -> 3 | +" in report
    assert (out / "long_range.png").read_bytes()[:4] == b"\x89PNG"


def test_mcnemar_by_hand():
    # after gains uses 2 and 3, loses use 1: 2 against 1 discordant, p = P(X <= 1 of 3) * 2 = 1
    assert ablate.mcnemar([1, 1, 0, 0, 1], [1, 0, 1, 1, 1]) == (2, 1, 1.0)
    # six uses lost, none gained: p = 2 * 0.5^6
    assert ablate.mcnemar([1] * 6 + [0], [0] * 7) == (0, 6, pytest.approx(2 * 0.5 ** 6))
    assert ablate.mcnemar([1, 0], [1, 0]) == (0, 0, 1.0)  # no discordant use: nothing to tell
