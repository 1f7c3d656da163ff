"""
stdlib_returns.py (classify.py's task) against hand-worked references: stub snippets whose
classes are written out, a function whose stripped text is written out, tiny stub and source
trees in tmp_path, the bootstrap against exact distributions (the binomial, and every resample
of five items enumerated), macro-F1 against scikit-learn, and the real typeshed for a few known
functions.
"""
import itertools
import json
import os
import random

import numpy as np
import pytest
from sklearn.metrics import f1_score

import stdlib_returns

HERE = os.path.dirname(os.path.abspath(__file__))

STUB = '''\
import sys
from typing import Any, Dict, Generator, Iterator, List, Literal, Optional, Tuple, Union, overload
from typing_extensions import Self, TypeAlias

_T = TypeVar("_T")
_Pair: TypeAlias = tuple[int, int]
_Maybe = _Pair | None

def nothing() -> None: ...
def text() -> str: ...
def flag(x) -> bool: ...
def guard(x) -> TypeIs[int]: ...
def maybe_new(x) -> str | None: ...
def maybe_old(x) -> Optional[int]: ...
def maybe_union(x) -> Union[bytes, None]: ...
def maybe_alias() -> _Maybe: ...
def pair() -> Tuple[int, str]: ...
def alias() -> _Pair: ...
def count() -> int: ...
def names() -> List[str]: ...
def data() -> bytes: ...
def ratio() -> float: ...
def lines() -> Iterator[str]: ...
def numbers() -> Generator[int, None, None]: ...
def anything_iterable() -> collections.abc.Iterable[int]: ...
def table() -> Dict[str, int]: ...
def view() -> Mapping[str, int]: ...
def anything() -> Any: ...
def same(x: _T) -> _T: ...
def mode() -> Literal["r", "w"]: ...
def mixed() -> Literal["r", 1]: ...
def quoted() -> "list[int]": ...
def either() -> str | bytes: ...
def never() -> NoReturn: ...
@overload
def agree(x: int) -> int: ...
@overload
def agree(x: str) -> int: ...
@overload
def differ(x: str) -> str: ...
@overload
def differ(x: bytes) -> bytes: ...
def unannotated(x): ...
def _private() -> int: ...
if sys.version_info >= (3, 0):
    def versioned() -> str: ...
else:
    def versioned() -> int: ...
if sys.platform == "no-such-os" or sys.version_info < (3,):
    def absent() -> int: ...
class Box:
    def copy(self) -> Self: ...
    @property
    def size(self) -> int: ...
    @size.setter
    def size(self, value: int) -> None: ...
    def _hidden(self) -> int: ...
    class Lid:
        def is_open(self) -> bool: ...
class _Private:
    def method(self) -> int: ...
'''

LABELS = {
    "nothing": "None", "text": "str", "flag": "bool", "guard": "bool", "maybe_new": "Optional",
    "maybe_old": "Optional", "maybe_union": "Optional", "maybe_alias": "Optional", "pair": "tuple",
    "alias": "tuple", "count": "int", "names": "list", "data": "bytes", "ratio": "float",
    "lines": "Iterator", "numbers": "Iterator", "anything_iterable": "Iterator", "table": "dict",
    "view": "other", "anything": "other", "same": "other", "mode": "str", "mixed": "other",
    "quoted": "list", "either": "other", "never": "other", "agree": "int", "versioned": "str",
    "Box.copy": "other", "Box.size": "int", "Box.Lid.is_open": "bool"}


def test_stub_labels_collapse_to_the_twelve_classes():
    labels, left_out = stdlib_returns.stub_returns(STUB)
    assert labels == LABELS
    assert set(labels.values()) == set(stdlib_returns.CLASSES)  # each class at least once
    assert left_out == {"overloads disagree": 1, "no return type in the stub": 1}


# ----------------------------------------------------------------------------- source side

SOURCE = '''\
import functools

class Box:
    @staticmethod
    @functools.cache
    def make(size: int = 3, /, *args: str, key: "Key" = None,
             **kw: dict[str, int]) -> "Box":
        """Make a box: `x: int -> str` stays in the docstring."""
        def inner(a: int) -> int:
            return a
        return Box(inner(size))

    def doc(self):
        """A docstring whose second line
starts further left than the def."""
        return 1

    @property
    def size(self):
        return self._size

    @size.setter
    def size(self, value):
        self._size = value

def naïve(café: int=1)->str:
    return "é"

def _private():
    return 1

if True:
    def twice():
        return 1
else:
    def twice():
        return 2
'''


def test_strip_annotations_cuts_spans_and_keeps_the_rest():
    functions, repeated = stdlib_returns.source_functions(SOURCE)
    assert list(functions) == ["Box.make", "Box.doc", "Box.size", "naïve", "twice"]
    assert repeated == 1  # twice: the first one is kept
    assert functions["Box.make"]["line"] == 4  # its first decorator
    assert functions["Box.make"]["text"] == '''\
@staticmethod
@functools.cache
def make(size = 3, /, *args, key = None,
         **kw):
    """Make a box: `x: int -> str` stays in the docstring."""
    def inner(a):
        return a
    return Box(inner(size))
'''
    assert functions["Box.doc"]["text"] == '''\
def doc(self):
    """A docstring whose second line
starts further left than the def."""
    return 1
'''
    assert functions["Box.size"]["text"].startswith("@property\ndef size(self):")  # not the setter
    assert functions["naïve"]["text"] == 'def naïve(café=1):\n    return "é"\n'
    assert stdlib_returns.source_functions("def broken(:\n") == (None, 0)
    assert stdlib_returns.cut_cleanly(functions["Box.make"]["text"])
    assert not stdlib_returns.cut_cleanly("def f(x) -> int:\n    return 1\n")
    assert not stdlib_returns.cut_cleanly("def f(x=(1):\n    return 1\n")  # a cut that broke it


def write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_build_examples_matches_stub_and_source_by_module(tmp_path):
    stubs, lib = tmp_path / "stubs", tmp_path / "lib"
    write(stubs, {"mod.pyi": "def f() -> int: ...\ndef g(x: int) -> str: ...\n"
                             "def in_c() -> bool: ...\n",
                  "pkg/__init__.pyi": "class K:\n    def m(self) -> bool: ...\n",
                  "pkg/sub.pyi": "def h() -> bytes: ...\n",  # a package stub, a module source
                  "held.pyi": "def f() -> int: ...\n", "encodings/x.pyi": "def f() -> int: ...\n"})
    one = "def f():\n    return 1\n"
    files = write(lib, {"mod.py": one + "\ndef g(x: int) -> str:\n    return str(x)\n",
                        "pkg/__init__.py": "class K:\n    def m(self):\n        return True\n",
                        "pkg/sub.py": "def h():\n    return b''\n", "held.py": one,
                        "encodings/x.py": one, "test/test_mod.py": one, "nostub.py": one})
    examples, counts = stdlib_returns.build_examples(stubs, lib, files, val_files=["held.py"])
    assert [(e["module"], e["name"], e["label"], e["file"]) for e in examples] == [
        ("mod", "f", "int", "mod.py"), ("mod", "g", "str", "mod.py"),
        ("pkg", "K.m", "bool", "pkg/__init__.py"), ("pkg.sub", "h", "bytes", "pkg/sub.py")]
    assert examples[1]["text"] == "def g(x):\n    return str(x)\n" and examples[1]["line"] == 4
    assert counts == {"files in prepare.py's val split": 1, "files without a stub": 1,
                      "files in test/, idlelib, lib2to3, encodings": 2,
                      "stub functions without a def in the source": 1,
                      "source functions defined twice (first kept)": 0}
    assert stdlib_returns.module_name("zipfile/__init__.pyi") == "zipfile"
    assert stdlib_returns.module_name("zipfile.py") == "zipfile"


# ----------------------------------------------------------------------------- splits

def test_split_by_module_is_disjoint_seeded_and_large_enough():
    examples = [{"module": f"m{m}", "name": f"f{i}"} for m in range(40) for i in range(m % 7 + 1)]
    splits = stdlib_returns.split_by_module(examples, seed=3, test_min=30, dev_min=20)
    modules = {s: {e["module"] for e in split} for s, split in splits.items()}
    assert not (modules["train"] & modules["dev"] or modules["train"] & modules["test"]
                or modules["dev"] & modules["test"])
    assert sum(map(len, splits.values())) == len(examples) and len(splits["test"]) >= 30
    assert len(splits["dev"]) >= 20 and splits["train"]
    assert splits == stdlib_returns.split_by_module(examples, seed=3, test_min=30, dev_min=20)
    other_seed = stdlib_returns.split_by_module(examples, seed=4, test_min=30, dev_min=20)
    assert modules["test"] != {e["module"] for e in other_seed["test"]}
    with pytest.raises(ValueError, match="too few"):
        stdlib_returns.split_by_module(examples, seed=3, test_min=len(examples), dev_min=1)


# ----------------------------------------------------------------------------- baselines

RULE_CASES = {
    "def f(x):\n    print(x)\n": "None",
    "def f(x):\n    if x:\n        return\n    x.go()\n": "None",
    "def f(x):\n    if x:\n        return True\n    return False\n": "bool",
    "def f(x):\n    return x in {1, 2}\n": "bool",
    "def f(x):\n    return f'<{x}>'\n": "str",
    "def f(x):\n    return '-'.join(x)\n": "str",
    "def f(x):\n    return '%s!' % x\n": "str",
    "def f(x):\n    for i in x:\n        yield i\n": "Iterator",
    "@contextlib.contextmanager\ndef f(x):\n    yield x\n": "other",
    "def f(x):\n    def g():\n        yield 1\n    g()\n": "None",  # the nested def's yield
    "def f(x):\n    if x:\n        return None\n    return x.y\n": "Optional",
    "def f(x):\n    return len(x)\n": "int",
    "def f(x):\n    return x, 1\n": "tuple",
    "def f(x):\n    return [i for i in x]\n": "list",
    "def f(x):\n    return {k: 1 for k in x}\n": "dict",
    "def f(x):\n    return b'x'\n": "bytes",
    "def f(x):\n    return 0.5\n": "float",
    "def f(x):\n    return self.x\n": "other",
    "def f(x):\n    if x:\n        return x.y\n    return 3\n": "int",  # the first with a look
}


@pytest.mark.parametrize("code, label", RULE_CASES.items())
def test_ast_rule(code, label):
    assert stdlib_returns.ast_rule(code) == label


def test_words_split_identifiers():
    assert stdlib_returns.words("def getHTTPName(self_ref): return None") == [
        "def", "gethttpname", "get", "http", "name", "self_ref", "self", "ref", "return", "none"]


def test_tfidf_chooses_c_on_dev_never_on_test():
    rng = random.Random(0)
    def examples(n):
        return [{"text": f"def f():\n    return {rng.choice(['alpha', 'beta'])}_{w} "
                         f"x{rng.randrange(5)}\n"} for w in range(n)]
    splits = {s: examples(n) for s, n in (("train", 40), ("dev", 20), ("test", 20))}
    for split in splits.values():
        for e in split:
            e["label"] = "str" if "alpha" in e["text"] else "int"
    pred, c, dev_accuracy = stdlib_returns.tfidf_logreg(splits)
    assert pred == [e["label"] for e in splits["test"]]
    assert set(dev_accuracy) == set(stdlib_returns.C_GRID)
    for e in splits["test"]:  # wrong test labels change nothing the model or its C saw
        e["label"] = "bool"
    assert stdlib_returns.tfidf_logreg(splits)[:2] == (pred, c)


# ----------------------------------------------------------------------------- metrics

def test_bootstrap_known_cases():
    assert stdlib_returns.bootstrap_interval([1] * 50) == (1.0, 1.0)
    assert stdlib_returns.bootstrap_interval([0] * 50) == (0.0, 0.0)
    a = np.random.default_rng(0).random(200) < 0.7
    assert stdlib_returns.paired_bootstrap(a, a) == (0.0, 0.0)
    assert stdlib_returns.f1_interval(["a", "b", "c"] * 10, ["a", "b", "c"] * 10) == (1.0, 1.0)
    with pytest.raises(ValueError):
        stdlib_returns.paired_bootstrap([1, 0], [1, 0, 1])


def test_bootstrap_matches_the_exact_distributions():
    # 12 of 20 right: a resample's accuracy is Binomial(20, 0.6) / 20, whose CDF passes 0.025
    # between 7 (0.021) and 8 (0.057) and 0.975 between 15 (0.949) and 16 (0.984).
    for seed in (0, 1):
        assert stdlib_returns.bootstrap_interval([1] * 12 + [0] * 8, n=10_000,
                                                 seed=seed) == (0.4, 0.8)
    # Paired: every one of the 5^5 resamples of five items, enumerated.
    a, b = np.array([1, 1, 1, 0, 0]), np.array([1, 0, 0, 0, 1])
    every = np.array(list(itertools.product(range(5), repeat=5)))
    exact = np.percentile(a[every].mean(1) - b[every].mean(1), [2.5, 97.5])
    assert stdlib_returns.paired_bootstrap(a, b, n=10_000, seed=0) == pytest.approx(tuple(exact))


def test_macro_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    gold, pred = rng.choice(["a", "b", "c", "d"], 300), rng.choice(["a", "b", "c", "e"], 300)
    assert stdlib_returns.macro_f1(gold, pred) == pytest.approx(f1_score(gold, pred,
                                                                         average="macro"))
    assert stdlib_returns.macro_f1(["a", "b"], ["a", "b"]) == 1.0
    assert stdlib_returns.macro_f1(["a", "a"], ["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)


# ----------------------------------------------------------------------------- the real data

def test_real_typeshed_labels():
    root, version = stdlib_returns.typeshed_stdlib()
    os_labels = stdlib_returns.stub_returns((root / "os" / "__init__.pyi").read_text())[0]
    # os.path's functions live in genericpath
    path_labels = stdlib_returns.stub_returns((root / "genericpath.pyi").read_text())[0]
    assert os_labels["getcwd"] == "str" and os_labels["getcwdb"] == "bytes"
    assert os_labels["walk"] == "Iterator"
    assert path_labels["exists"] == "bool" and path_labels["getsize"] == "int"
    assert "fspath" not in os_labels  # str for a str, bytes for bytes: overloads that disagree


def test_default_split_is_prepares(tmp_path):
    data = os.path.join(HERE, "data", "stdlib")
    if not os.path.exists(os.path.join(data, "meta.json")):
        pytest.skip("no data/stdlib: run prepare.py")
    meta = json.load(open(os.path.join(data, "meta.json")))
    if meta.get("seed") != stdlib_returns.PREPARE_SEED or meta.get("inputs"):
        pytest.skip("data/stdlib was not prepared with prepare.py's defaults")
    _, _, val, where = stdlib_returns.stdlib_split(tmp_path)  # no meta.json there: worked out again
    assert "worked out again" in where and val == meta["val_files"]
