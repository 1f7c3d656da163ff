"""Shared by the test files: one torch thread per test (autouse), and, as session fixtures that
return the helper itself, the helpers more than one file uses: write_data and log_of (test_train,
test_ablate), crafted_checkpoint (test_train, test_sample), train_tokenizer and save_checkpoint
(test_sample, test_finetune)."""
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and a second thread on a busy machine waits for its
    # core at every op (10x slower here): one thread keeps the tests fast and their timing steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- data, logs

def write_data(path, doc_lengths, val_lengths=(40, 50, 60), vocab=320, seed=0):
    """A data directory in prepare.py's format: random ordinary ids, each document
    [CLS] ... [SEP]."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    meta = {"vocab_size": vocab, "tokenizer_vocab_size": vocab, "dtype": "uint16",
            "cls_id": 0, "sep_id": 1, "pad_id": 2, "mask_id": 3, "unk_id": 4, "splits": {}}
    for split, lengths in (("train", doc_lengths), ("val", val_lengths)):
        docs = [np.concatenate([[0], rng.integers(5, vocab, n - 2), [1]]) for n in lengths]
        np.concatenate(docs).astype(np.uint16).tofile(path / f"{split}.bin")
        np.save(path / f"{split}_offsets.npy",
                np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        meta["splits"][split] = {"docs": len(lengths), "tokens": int(sum(lengths))}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(name="write_data", scope="session")
def write_data_fixture():
    """The write_data function above."""
    return write_data


def log_of(out, phase):
    return [json.loads(line)
            for line in (Path(out) / f"phase{phase}" / "log.jsonl").read_text().splitlines()]


@pytest.fixture(name="log_of", scope="session")
def log_of_fixture():
    """The log_of function above."""
    return log_of


# ----------------------------------------------------------------------------- checkpoints

class CodeOnLoad:
    """Unpickling this creates a file: what a malicious checkpoint could do with pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_checkpoint(path, marker):
    torch.save({"config": {}, "model": {}, "run": CodeOnLoad(str(marker))}, path)
    torch.load(path, weights_only=False)  # the test can fail: a full unpickle runs the code...
    assert marker.exists()
    marker.unlink()                       # ...and is undone here


@pytest.fixture(name="crafted_checkpoint", scope="session")
def crafted_checkpoint_fixture():
    """The crafted_checkpoint function above."""
    return crafted_checkpoint


def save_checkpoint(model, directory, tokenizer, prefix="_orig_mod."):
    """What train.py writes; the names carry torch.compile's prefix, as a compiled model's do."""
    os.makedirs(directory, exist_ok=True)
    state = {prefix + name: t for name, t in model.state_dict().items()}
    torch.save({"config": dataclasses.asdict(model.config), "model": state, "phase": 1, "step": 7,
                "meta": {"cls_id": 0, "sep_id": 1, "pad_id": 2, "mask_id": 3}, "optimizer": {}},
               os.path.join(directory, "ckpt.pt"))
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


@pytest.fixture(name="save_checkpoint", scope="session")
def save_checkpoint_fixture():
    """The save_checkpoint function above."""
    return save_checkpoint


# ----------------------------------------------------------------------------- tokenizer

SPECIALS = ["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"]


def train_tokenizer(lines, vocab_size=448):
    """A byte-level BPE like prepare.py's: [CLS] $A [SEP] around a text, [MASK] with lstrip."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, lstrip=(t == "[MASK]"), special=True) for t in SPECIALS]
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return tok


@pytest.fixture(name="train_tokenizer", scope="session")
def train_tokenizer_fixture():
    """The train_tokenizer function above."""
    return train_tokenizer
