"""
sample.py against independent references: Hugging Face transformers' ModernBERT (its fill-mask
pipeline, its logits, its hidden states) and brute force (each text run alone). A tiny tokenizer
and a tiny model are built here and saved both ways sample.py reads: our ckpt.pt and the Hugging
Face format.
"""
import io
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

import runtime
import sample
from modernbert import ModernBERT, config_for

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIALS = ["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"]  # those conftest's train_tokenizer adds
# several masks, masks at either end, and prompts longer than the tiny local window (+-8)
PROMPTS = [
    "for i in [MASK](len(items)):",
    "def __init__([MASK], name, value=None):\n    self.name = [MASK]\n    self.value = value",
    "[MASK] = textwrap.dedent(text)",
    "return [MASK]",
    "width = 70 if width is None else [MASK]\n"
    "lines = [line.strip() for line in text.splitlines()][MASK]",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, train_tokenizer, save_checkpoint):
    root = tmp_path_factory.mktemp("tiny")
    lines = [line for path in (textwrap.__file__, shutil.__file__)
             for line in open(path).read().splitlines()]
    tokenizer = train_tokenizer(lines)
    # spare rows, as a real vocabulary has
    vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64 + 64
    ids = {t: tokenizer.token_to_id(t) for t in SPECIALS}
    torch.manual_seed(0)
    # A larger init than training's 0.02, so attention is sharp and predictions depend on context,
    # and larger (tied) embeddings, so the output is peaked: a misplaced mask row, or a prompt that
    # sees its batch neighbours, then shows in the probabilities. Untrained, the model is flat.
    model = ModernBERT(config_for("tiny", vocab_size=vocab_size, pad_id=ids["[PAD]"],
                                  cls_id=ids["[CLS]"], sep_id=ids["[SEP]"], init_std=0.2)).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(3)
    save_checkpoint(model, root / "run" / "phase1", tokenizer)
    model.save_pretrained(root / "hf")
    tokenizer.save(str(root / "hf" / "tokenizer.json"))
    return {"root": root, "tokenizer": tokenizer, "model": model,
            "ckpt": str(root / "run" / "phase1" / "ckpt.pt"), "hf": str(root / "hf")}


@pytest.fixture(scope="module")
def reference(tiny):
    """transformers' own model and a PreTrainedTokenizerFast around the same tokenizer object."""
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny["tokenizer"], cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", unk_token="[UNK]")
    mlm = transformers.ModernBertForMaskedLM.from_pretrained(tiny["hf"], attn_implementation="sdpa",
                                                             dtype=torch.float32).eval()
    encoder = transformers.ModernBertModel.from_pretrained(tiny["hf"], attn_implementation="sdpa",
                                                           dtype=torch.float32).eval()
    return {"tokenizer": hf_tokenizer, "mlm": mlm, "encoder": encoder,
            "fill_mask": transformers.pipeline("fill-mask", model=mlm, tokenizer=hf_tokenizer,
                                               device="cpu")}


# ----------------------------------------------------------------------------- fill-mask

@pytest.mark.parametrize("source", ["ckpt", "hf"])
# all prompts in one packed forward, or one each
@pytest.mark.parametrize("batch_tokens", [8192, 1])
def test_fill_mask_equals_transformers_pipeline(tiny, reference, source, batch_tokens):
    model, tokenizer, _ = runtime.load_model(tiny[source], "cpu")
    results = sample.fill_mask(model, tokenizer, PROMPTS, top_k=5, batch_tokens=batch_tokens)
    for prompt, result in zip(PROMPTS, results):
        expected = reference["fill_mask"](prompt, top_k=5)
        expected = [expected] if isinstance(expected[0], dict) else expected  # one mask: not nested
        assert len(result["masks"]) == len(expected) == prompt.count("[MASK]")
        for got, want in zip(result["masks"], expected):
            assert [t for t, _, _ in got["top"]] == [w["token"] for w in want]
            assert [p for _, _, p in got["top"]] == \
                pytest.approx([w["score"] for w in want], abs=1e-5)
            # The embedding's spare rows (past the tokenizer's last id) decode to nothing there.
            assert [s for _, s, _ in got["top"]] == [w["token_str"] or f"<unused {w['token']}>"
                                                     for w in want]


def test_the_reference_is_sharp_and_context_dependent(tiny, reference):
    """Guards the test above against a flat model, under which any mask row would match."""
    model, tokenizer, _ = runtime.load_model(tiny["ckpt"], "cpu")
    results = sample.fill_mask(model, tokenizer, PROMPTS, top_k=1)
    top1 = [m["top"][0] for r in results for m in r["masks"]]
    assert min(p for _, _, p in top1) > 50 / model.config.vocab_size
    assert len({t for t, _, _ in top1}) > 1
    y, z = sample.fill_mask(model, tokenizer, ["x = [MASK] + y", "x = [MASK] + z"], top_k=1)
    # one token away changes it
    assert abs(y["masks"][0]["top"][0][2] - z["masks"][0]["top"][0][2]) > 0.05


def greedy_reference(mlm, hf_tokenizer, prompt):
    """Fill the most confident mask, rerun, repeat: with transformers' model, one prompt at a
    time."""
    ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"]
    steps = []
    while (open_ := (ids[0] == hf_tokenizer.mask_token_id).nonzero().flatten().tolist()):
        with torch.no_grad():
            probs = mlm(input_ids=ids).logits[0, open_].softmax(-1)
        best = probs.max(-1).values.argmax().item()
        top = probs[best].topk(3)
        steps.append((open_[best], top.indices.tolist(), top.values.tolist()))
        ids[0, open_[best]] = top.indices[0]
    return steps, hf_tokenizer.decode(ids[0, 1:-1])


def test_one_by_one_equals_a_greedy_loop_over_transformers(tiny, reference):
    model, tokenizer, _ = runtime.load_model(tiny["hf"], "cpu")
    # 3, 2 and 1 masks in one batch
    prompts = ["self.[MASK][MASK][MASK] = None", PROMPTS[1], PROMPTS[0]]
    results = sample.fill_mask(model, tokenizer, prompts, top_k=3, one_by_one=True)
    for prompt, result in zip(prompts, results):
        steps, filled = greedy_reference(reference["mlm"], reference["tokenizer"], prompt)
        got = sorted(result["masks"], key=lambda m: m["step"])
        assert [m["step"] for m in got] == list(range(1, len(steps) + 1))
        for m, (position, top_ids, top_probs) in zip(got, steps):
            assert m["position"] == position
            assert [t for t, _, _ in m["top"]] == top_ids
            assert [p for _, _, p in m["top"]] == pytest.approx(top_probs, abs=1e-5)
        assert result["filled"] == filled


# ----------------------------------------------------------------------------- embeddings

@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_embeddings_equal_brute_force(tiny, reference, pool):
    texts = [p.replace("[MASK]", "x") for p in PROMPTS] + ["a"]
    model, tokenizer, _ = runtime.load_model(tiny["ckpt"], "cpu")
    got = sample.embed_prompts(model, tokenizer, texts, pool=pool)
    # Each text alone through our model, pooled over all of its tokens.
    alone = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text).ids])
        with torch.no_grad():
            h = model.encode(ids)[0]
        alone.append(h.mean(0) if pool == "mean" else h[0])
    torch.testing.assert_close(got, torch.stack(alone), atol=1e-5, rtol=0)
    # transformers on a padded batch, averaged over the attention mask only.
    batch = reference["tokenizer"](texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = reference["encoder"](**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    want = (h * mask).sum(1) / mask.sum(1) if pool == "mean" else h[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    pairwise = F.cosine_similarity(got[:, None], got[None, :], dim=-1)
    torch.testing.assert_close(sample.cosine_matrix(got), pairwise, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- loading, CLI

def test_init_from_accepts_each_layout_and_picks_the_newest_phase(tiny, tmp_path, save_checkpoint):
    run = tmp_path / "run"
    torch.manual_seed(1)
    other = ModernBERT(tiny["model"].config)
    save_checkpoint(tiny["model"], run / "phase1", tiny["tokenizer"], prefix="module.")
    save_checkpoint(other, run / "phase2", tiny["tokenizer"], prefix="")
    # phase 1 is the newer file: time wins, not the name
    os.utime(run / "phase2" / "ckpt.pt", (1e9, 1e9))
    assert runtime.find_model(str(run)) == str(run / "phase1" / "ckpt.pt")
    assert runtime.find_model(str(run / "phase2")) == str(run / "phase2" / "ckpt.pt")
    assert runtime.find_model(tiny["hf"]) == tiny["hf"]
    want = tiny["model"].state_dict()
    for path in (str(run), tiny["hf"], tiny["ckpt"]):
        model, _, ids = runtime.load_model(path, "cpu")
        assert all(torch.equal(t, want[name]) for name, t in model.state_dict().items())
        assert ids == {name: tiny["tokenizer"].token_to_id(f"[{name.upper()}]")
                       for name in ("cls", "sep", "pad", "mask")}
    model, _, _ = runtime.load_model(str(run / "phase2"), "cpu")
    assert torch.equal(model.tok_embeddings.weight, other.tok_embeddings.weight)


def test_prompts_from_stdin_and_truncation(tiny, monkeypatch, capsys):
    long_prompt = "[MASK] " + "word " * 600
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPTS[0]}\n\n{long_prompt}\n"))
    results = sample.main(["--init_from", tiny["ckpt"], "--file", "-", "--truncate",
                           "--top_k", "2"])
    model, tokenizer, _ = runtime.load_model(tiny["ckpt"], "cpu")
    # The same two prompts in one call: which local-attention kernel runs depends on the longest
    # document in the batch (modernbert.py's Documents), so alone the first prompt's probabilities
    # could differ in their last float bits.
    first = sample.fill_mask(model, tokenizer, [PROMPTS[0], long_prompt], top_k=2,
                             truncate=True)[0]
    assert [r["text"] for r in results] == [PROMPTS[0], long_prompt]  # the blank line is no prompt
    assert [t for t, _, _ in results[0]["masks"][0]["top"]] == \
        [t for t, _, _ in first["masks"][0]["top"]]
    assert [p for *_, p in results[0]["masks"][0]["top"]] == \
        pytest.approx([p for *_, p in first["masks"][0]["top"]], abs=1e-6)
    # The long prompt keeps its first 511 tokens and gets its [SEP] back: 512, the tiny context.
    kept = tokenizer.encode(long_prompt).ids[:511]
    assert results[1]["masks"][0]["position"] == 1
    assert results[1]["filled"] == tokenizer.decode([results[1]["masks"][0]["top"][0][0],
                                                     *kept[2:]])
    out = capsys.readouterr().out
    assert f"-> {first['filled']}" in out and "[MASK] 1:" in out


def test_embed_prints_the_cosine_table(tiny, capsys):
    texts = ["def add(a, b):", "def plus(x, y):", "import os"]
    got = sample.main(["--init_from", tiny["hf"], "--embed", "--pool", "cls"]
                      + [a for t in texts for a in ("--text", t)])
    model, tokenizer, _ = runtime.load_model(tiny["hf"], "cpu")
    torch.testing.assert_close(got, sample.embed_prompts(model, tokenizer, texts, pool="cls"),
                               atol=1e-6, rtol=0)
    table = capsys.readouterr().out.split("cosine similarity:\n")[1].splitlines()[1:]
    shown = torch.tensor([[float(x) for x in line.split()[1:]] for line in table])
    # printed to 3 decimals
    torch.testing.assert_close(shown, sample.cosine_matrix(got), atol=5e-4, rtol=0)


def test_no_flags_uses_the_newest_checkpoint_of_out(tiny, tmp_path, save_checkpoint):
    save_checkpoint(tiny["model"], tmp_path / "out" / "phase1", tiny["tokenizer"])
    shutil.copytree(tmp_path / "out" / "phase1", tmp_path / "out" / "phase2")
    os.utime(tmp_path / "out" / "phase1" / "ckpt.pt", (1e9, 1e9))
    run = subprocess.run([sys.executable, os.path.join(HERE, "sample.py")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(os.path.join("out", "phase2", "ckpt.pt") + ":")
    for prompt in sample.DEFAULT_PROMPTS:
        assert f"\n{sample.show(prompt)}\n  -> " in run.stdout
    assert run.stdout.count("[MASK] 1:  ") == len(sample.DEFAULT_PROMPTS)
    assert run.stdout.count("[MASK] 2:  ") == sum(p.count("[MASK]") > 1
                                                  for p in sample.DEFAULT_PROMPTS) > 0


# ----------------------------------------------------------------------------- bad input

def error_of(argv, monkeypatch=None, cwd=None):
    if cwd:
        monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert isinstance(e.value.code, str) and \
        e.value.code.startswith("sample.py: error: "), e.value.code
    return e.value.code


def test_bad_prompts_are_clear_errors(tiny):
    ckpt = ["--init_from", tiny["ckpt"]]
    assert "prompt 2 ('def f(x): return x') has no [MASK]" in \
        error_of(ckpt + ["--text", "a [MASK]", "--text", "def f(x): return x"])
    assert "prompt 1 is empty" in error_of(ckpt + ["--text", "  "])
    assert "prompt 2 is empty" in error_of(ckpt + ["--embed", "--text", "a", "--text", ""])
    message = error_of(ckpt + ["--text", "word " * 600 + "[MASK]"])
    assert "longer than the model's context of 512" in message and "--truncate" in message
    assert "past the 512 tokens kept by --truncate" in \
        error_of(ckpt + ["--truncate", "--text", "word " * 600 + "[MASK]"])
    assert "cannot read --file 'no/such/prompts.txt'" in \
        error_of(ckpt + ["--file", "no/such/prompts.txt"])


def test_bad_models_are_clear_errors(tiny, tmp_path, monkeypatch):
    assert "'nowhere/ckpt.pt' does not exist" in error_of(["--init_from", "nowhere/ckpt.pt"])
    (tmp_path / "empty").mkdir()
    assert "is not a model" in error_of(["--init_from", str(tmp_path / "empty")])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "is not a model checkpoint" in error_of(["--init_from", str(tmp_path / "notes.txt")])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "is not a model checkpoint" in error_of(["--init_from", str(tmp_path / "tensor.pt")])
    shutil.copytree(tiny["hf"], tmp_path / "hf")
    os.remove(tmp_path / "hf" / "tokenizer.json")
    assert "no tokenizer.json" in error_of(["--init_from", str(tmp_path / "hf")])
    os.remove(tmp_path / "hf" / "model.safetensors")
    assert "is not a ModernBERT model" in error_of(["--init_from", str(tmp_path / "hf")])
    assert "run `python train.py --phase 1` first" in \
        error_of(["--text", "a [MASK]"], monkeypatch, tmp_path)


def test_tokenizer_without_mask_is_a_clear_error(tiny, tmp_path, save_checkpoint):
    vocab = {t: i for i, t in enumerate(["[CLS]", "[SEP]", "[PAD]", "[UNK]", "a", "b"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    save_checkpoint(tiny["model"], tmp_path, tokenizer)
    assert "has no [MASK] token" in error_of(["--init_from", str(tmp_path), "--text", "a b"])
    # Still fine for embeddings; without a post-processor, sample.py adds [CLS] ... [SEP] itself.
    model, tokenizer, ids = runtime.load_model(str(tmp_path), "cpu")
    assert ids["mask"] is None
    with torch.no_grad():
        want = model.encode(torch.tensor([[vocab["[CLS]"], vocab["a"], vocab["b"],
                                           vocab["[SEP]"]]]))[0].mean(0)
    torch.testing.assert_close(sample.embed_prompts(model, tokenizer, ["a b"])[0], want,
                               atol=1e-5, rtol=0)


def test_cli_errors_exit_nonzero_without_a_traceback(tiny):
    run = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"),
                          "--init_from", tiny["ckpt"], "--text", "no mask here"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip() == "sample.py: error: prompt 1 ('no mask here') has no [MASK] to fill"


def test_a_checkpoint_that_would_run_code_is_refused(tiny, tmp_path, crafted_checkpoint):
    """sample.py reads checkpoints with weights_only=True: a crafted ckpt.pt is a one-line error
    and the code in it never runs (while a full unpickle of the same file would run it)."""
    marker = tmp_path / "pwned"
    crafted_checkpoint(tmp_path / "ckpt.pt", marker)  # asserts a full unpickle would run it
    shutil.copy(os.path.join(os.path.dirname(tiny["ckpt"]), "tokenizer.json"),
                tmp_path / "tokenizer.json")
    message = error_of(["--init_from", str(tmp_path), "--text", "a [MASK]"])
    assert "could run code" in message and "\n" not in message
    assert not marker.exists()


# ----------------------------------------------------------------------- exports in other libraries

@pytest.mark.parametrize("family", ["modernbert", "bert"])
def test_exported_hf_dir_is_a_fill_mask_pipeline_with_our_predictions(tiny, tmp_path, family):
    """export_hf's directory (what train.py writes to out/phaseN/hf) works in transformers as it
    is: AutoTokenizer knows the special tokens and the length, and pipeline("fill-mask") gives
    the same top 5, token and probability, as sample.py, for ModernBERT and for a BERT-mode
    model."""
    transformers = pytest.importorskip("transformers")
    model = tiny["model"]
    if family == "bert":
        torch.manual_seed(0)
        ids = {k: getattr(model.config, k) for k in ("vocab_size", "pad_id", "cls_id", "sep_id")}
        model = ModernBERT(config_for("bert-mini", n_layers=2, d_model=64, n_heads=4, d_ff=96,
                                      max_seq_len=256, init_std=0.2, **ids)).eval()
    tokenizer_file = tmp_path / "tokenizer.json"
    tiny["tokenizer"].save(str(tokenizer_file))
    runtime.export_hf(model, str(tmp_path), str(tokenizer_file))
    hf_dir = str(tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert [auto.cls_token, auto.sep_token, auto.pad_token, auto.mask_token,
            auto.unk_token] == SPECIALS
    assert auto.model_max_length == model.config.max_seq_len
    assert auto.mask_token_id == tiny["tokenizer"].token_to_id("[MASK]")
    pipe = transformers.pipeline("fill-mask", model=hf_dir, top_k=5, device="cpu")
    prompts = ["for i in [MASK](len(items)):", "return [MASK]"]
    ours = sample.fill_mask(model, tiny["tokenizer"], prompts, top_k=5)
    for prompt, mine in zip(prompts, ours):
        theirs = pipe(prompt)
        assert [t["token"] for t in theirs] == [i for i, _, _ in mine["masks"][0]["top"]]
        assert [t["score"] for t in theirs] == \
            pytest.approx([p for _, _, p in mine["masks"][0]["top"]], abs=1e-5)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_sentence_transformers_loads_the_export_with_our_pooling(tiny, tmp_path, pool):
    """With pooling (finetune.py's out/finetune/hf), the export is a sentence-transformers model:
    SentenceTransformer(path).encode equals sample.py --embed's vectors, mean or [CLS] pooled."""
    st = pytest.importorskip("sentence_transformers")
    tokenizer_file = tmp_path / "tokenizer.json"
    tiny["tokenizer"].save(str(tokenizer_file))
    runtime.export_hf(tiny["model"], str(tmp_path), str(tokenizer_file), pooling=pool)
    texts = ["def add(a, b):\n    return a + b", "x", "with open(path) as f:\n    data = f.read()"]
    theirs = st.SentenceTransformer(str(tmp_path / "hf"), device="cpu").encode(
        texts, convert_to_tensor=True)
    ours = sample.embed_prompts(tiny["model"], tiny["tokenizer"], texts, pool=pool)
    torch.testing.assert_close(theirs.float().cpu(), ours, atol=1e-5, rtol=0)
