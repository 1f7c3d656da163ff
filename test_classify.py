"""classify.py: the head against transformers, fine-tuning, exact --resume, --predict, and its
one-line errors, on tiny models and a tiny task built here (the task itself is tested in
test_stdlib_returns.py)."""
import json

import pytest
import torch

import classify
import runtime
from modernbert import ModernBERT, config_for

RETURNS = {"None": "    print(x)\n", "bool": "    return x > 0\n", "str": "    return f'{x}'\n",
           "int": "    return len(x)\n"}


def tiny_task():
    """Splits in stdlib_returns' shape: functions whose body gives away their class."""
    def examples(n, start):
        return [{"text": f"def f{start + i}(x):\n" + body, "label": label, "module": f"m{start}",
                 "name": f"f{start + i}"}
                for i in range(n) for label, body in RETURNS.items()]
    splits = {"train": examples(6, 0), "dev": examples(2, 100), "test": examples(3, 200)}
    info = {"classes": {s: {} for s in splits}, "split_modules": {s: [] for s in splits}}
    return splits, info


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, train_tokenizer, save_checkpoint):
    """A tiny ModernBERT and a tiny BERT-mode model, saved as train.py would, with a tokenizer."""
    root = tmp_path_factory.mktemp("pretrained")
    tokenizer = train_tokenizer([body for body in RETURNS.values()] * 20 + ["def f(x):"] * 20)
    ids = dict(vocab_size=-(-tokenizer.get_vocab_size() // 64) * 64, cls_id=0, sep_id=1, pad_id=2)
    paths = {}
    for name, preset in [("modernbert", "tiny"), ("bert", "bert-mini")]:
        torch.manual_seed(0)
        shape = {} if name == "modernbert" else dict(n_layers=2, d_model=64, n_heads=4, d_ff=96,
                                                    max_seq_len=128)
        model = ModernBERT(config_for(preset, init_std=0.2, **ids, **shape))
        save_checkpoint(model, root / name, tokenizer, prefix="")
        paths[name] = str(root / name / "ckpt.pt")
    return paths


def small_run(monkeypatch, ckpt, out, *extra):
    monkeypatch.setattr(classify.task, "load_data", lambda *a: tiny_task())
    monkeypatch.setattr(classify.task, "data_summary", lambda info: "")
    return classify.main(["--init_from", ckpt, "--out", str(out), "--epochs", "8", "--batch_size",
                          "8", "--eval_every", "4", "--lr", "3e-3", "--max_tokens", "24",
                          "--dtype", "fp32", "--device", "cpu", "--bootstrap", "200", *extra])


@pytest.mark.parametrize("family,pooling", [("modernbert", "cls"), ("modernbert", "mean"),
                                            ("bert", "cls")])
def test_export_is_transformers_sequence_classifier_with_our_logits(pretrained, tmp_path,
                                                                   monkeypatch, family, pooling):
    """OUT/hf loads in ModernBertForSequenceClassification (BertForSequenceClassification for a
    BERT-mode model) with num_labels and id2label, and gives our logits, padded batch or not."""
    transformers = pytest.importorskip("transformers")
    results = small_run(monkeypatch, pretrained[family], tmp_path, "--pooling", pooling)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"))
    expected = "BertForSequenceClassification" if family == "bert" else \
        "ModernBertForSequenceClassification"
    assert type(hf).__name__ == expected
    assert hf.config.num_labels == len(classify.task.CLASSES)
    assert hf.config.id2label == dict(enumerate(classify.task.CLASSES))
    model, tokenizer, labels = classify.load_classifier(str(tmp_path / "ckpt.pt"), "cpu")
    assert labels == classify.task.CLASSES
    texts = ["def f(x):\n    return x > 0\n", "def g(y):\n    print(y)\n    print(y, y)\n"]
    seqs = runtime.encode(tokenizer, texts)
    ours = torch.log(classify.predict(model, seqs))                     # log-softmax of the logits
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    batch = auto(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf.eval()(**batch).logits.log_softmax(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    row = results["systems"][f"{pretrained[family]}, fine-tuned"]
    assert row["predictions"] and 0 <= row["accuracy"] <= 1 and row["best_step"] >= 4


def test_fine_tune_learns_stops_early_and_resumes_exactly(pretrained, tmp_path, monkeypatch):
    """It learns the giveaway task (test accuracy well above the 25% of one class in four), and an
    interrupted run (killed right after its second checkpoint) continued with --resume ends with
    the same best weights, history and predictions as the run that was never interrupted."""
    whole = small_run(monkeypatch, pretrained["modernbert"], tmp_path / "whole")
    row = whole["systems"][f"{pretrained['modernbert']}, fine-tuned"]
    assert row["accuracy"] > 0.5
    saves, real = [], classify.save_atomic

    def save_then_die(path, state):
        real(path, state)
        saves.append(state["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(classify, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        small_run(monkeypatch, pretrained["modernbert"], tmp_path / "cut")
    monkeypatch.setattr(classify, "save_atomic", real)
    again = small_run(monkeypatch, pretrained["modernbert"], tmp_path / "cut", "--resume")
    row_again = again["systems"][f"{pretrained['modernbert']}, fine-tuned"]
    assert row_again["history"] == row["history"] and row_again["predictions"] == row["predictions"]
    best = lambda out: torch.load(out / "ckpt.pt", weights_only=True)["best"]
    for name, tensor in best(tmp_path / "whole").items():
        assert torch.equal(tensor, best(tmp_path / "cut")[name]), name


def test_texts_are_cut_to_a_learned_position_table(pretrained, tmp_path, monkeypatch):
    """A BERT-mode model's positions stop at its trained length (128 here): --max_tokens beyond
    it cuts the functions to that length instead of indexing past the table."""
    long_task = classify.task.load_data
    splits, info = tiny_task()
    for e in splits["train"] + splits["dev"] + splits["test"]:
        e["text"] += "    # " + "padding words " * 100 + "\n"
    monkeypatch.setattr(classify.task, "load_data", lambda *a: (splits, info))
    monkeypatch.setattr(classify.task, "data_summary", lambda info: "")
    assert long_task is not classify.task.load_data
    results = classify.main(["--init_from", pretrained["bert"], "--out", str(tmp_path), "--epochs",
                             "1", "--batch_size", "8", "--max_tokens", "400", "--dtype", "fp32",
                             "--device", "cpu", "--bootstrap", "200"])
    assert results["systems"][f"{pretrained['bert']}, fine-tuned"]["steps"] == 3


def test_predict_prints_label_and_probability(pretrained, tmp_path, monkeypatch, capsys):
    small_run(monkeypatch, pretrained["modernbert"], tmp_path)
    capsys.readouterr()
    got = classify.main(["--out", str(tmp_path), "--predict", "def f(x):\\n    return x > 0",
                         "--device", "cpu"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(got) == len(printed) == 1
    label, probability = got[0]
    assert label in classify.task.CLASSES and 0 < probability <= 1
    assert printed[0].startswith(f"{label} {probability:.3f}  def f(x):\\n")


@pytest.mark.parametrize("argv,message", [
    (["--lr", "0"], "--lr must be positive"), (["--epochs", "0"], "--epochs must be at least 1"),
    (["--warmup", "1"], "--warmup must be [0, 1)"), (["--resume", "--overwrite"], "pick one"),
    (["--predict", "x", "--baselines"], "takes no training flags")])
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        classify.main(["--out", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_files_are_one_line_and_write_nothing(pretrained, tmp_path):
    for argv, message in [(["--init_from", str(tmp_path / "nowhere")], "does not exist"),
                          (["--predict", "def f(): pass"], "no classifier in")]:
        with pytest.raises(SystemExit) as e:
            classify.main(["--out", str(tmp_path / "out"), *argv])
        assert str(e.value.code).startswith("classify.py: error: ") and message in str(e.value.code)
    assert not (tmp_path / "out").exists()


def test_a_foreign_data_dir_and_a_file_as_out_are_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        classify.main(["--baselines", "--out", str(tmp_path / "file")])
    assert e.value.code == 2 and "is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text(json.dumps({"source": "my own code"}))
    with pytest.raises(SystemExit) as e:
        classify.main(["--baselines", "--data", str(tmp_path / "data"),
                       "--out", str(tmp_path / "o")])
    assert str(e.value).startswith("classify.py: error: ") and "my own code" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
