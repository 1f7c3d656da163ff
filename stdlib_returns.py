"""
The classification task of classify.py: predict what a standard-library function returns, from
its source with the annotations stripped. This file builds the labelled examples, their split,
and the baselines a model must beat; classify.py fine-tunes models on them.

    python classify.py --baselines                  # data summary + baseline table -> out/classify/

The labels come from typeshed, the type stubs every Python type checker reads, in the copy that
the jedi wheel bundles (site-packages/jedi/third_party/typeshed/stdlib). The project pins
jedi==0.20.0: a well-known wheel that ships typeshed whole, already installed on the machine, so
the labels need no download and the same wheel gives the same labels. A stub's return type
collapses to one of 12 classes (CLASSES; collapse() says which annotation goes where and why).

Each public function and method of a stub (module-level, or in a class; no part of its name
starting with _) is matched by module and qualified name with its implementation in this
Python's own stdlib source, the files prepare.py reads. An example is that source: dedented,
decorators and docstrings kept, the parameter and `-> X` annotations cut out of the text (cut,
not ast.unparse'd, so the formatting stays as pretraining saw it). Left out: test/, idlelib,
lib2to3, encodings, and every file of prepare.py's val split. Those val files are used for
nothing here, neither for training nor for testing: they stay what they are for, text no model
was trained on. Pretraining did see the rest of this code (prepare.py's train split), never
the labels.

Splits are by module (no module in two splits; submodules of one package may fall apart),
seeded: test first, until it holds at least --test_min functions, then dev until --dev_min, the
rest train. Baselines, each with a 95% bootstrap interval on test: the majority class of train,
an AST rule on the function's own returns and yields (ast_rule), and TF-IDF over words and
identifier parts with logistic regression, its C chosen on dev. classify.py's OUT/results.json
holds every number, the modules of each split, the test items in order and each system's
predictions on
them, so that a fine-tuned model can be compared with them item by item (paired_bootstrap).
A model's part plugs in at main: load_data() gives the splits, scores() its row of the table.
"""
import ast
import operator
import os
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

import prepare

CLASSES = ["None", "str", "bool", "Optional", "tuple", "int", "list", "bytes", "float",
           "Iterator", "dict", "other"]
DEFAULTS = dict(seed=1337, test_min=1000, dev_min=500, bootstrap=10_000)
PREPARE_SEED = 1337  # prepare.py's --seed default: its val split, when data/stdlib is not there
LEFT_OUT = {"test", "tests", "idle_test", "idlelib", "lib2to3", "encodings"}  # any path part
C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)  # TF-IDF + LR, chosen on dev


# ----------------------------------------------------------------------------- walking definitions

def condition(test):
    """True/False for a stub's `if` on sys.version_info or sys.platform, evaluated for the
    running Python (typeshed writes one stub for every version and platform); None for any
    other test, whose two branches are then both read."""
    if isinstance(test, ast.BoolOp):
        values = [condition(v) for v in test.values]
        if None in values:
            return None
        return all(values) if isinstance(test.op, ast.And) else any(values)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        value = condition(test.operand)
        return None if value is None else not value
    compare = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
               ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in compare:
        left, right = known_value(test.left), known_value(test.comparators[0])
        if left is not None and right is not None:
            return compare[type(test.ops[0])](left, right)
    return None


def known_value(node):
    """sys.version_info (as a tuple), sys.platform, a constant or a tuple of them; else None."""
    if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "sys":
        running = {"version_info": tuple(sys.version_info[:3]), "platform": sys.platform}
        return running.get(node.attr)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
        return tuple(e.value for e in node.elts)
    return None


def live(body, stub):
    """The statements of a block, through if/try blocks. In a stub an `if` on the version or
    platform gives only the branch that holds; in source code every branch is read."""
    for node in body:
        if isinstance(node, ast.If):
            holds = condition(node.test) if stub else None
            if holds is not False:
                yield from live(node.body, stub)
            if holds is not True:
                yield from live(node.orelse, stub)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):  # try*: 3.11+
            for block in [node.body, *[h.body for h in node.handlers], node.orelse, node.finalbody]:
                yield from live(block, stub)
        else:
            yield node


def defs(body, stub, prefix=""):
    """(qualified name, node) of every module-level function and every method of a class
    (nested classes too, "Outer.Inner.method"), in file order; never inside a function."""
    for node in live(body, stub):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from defs(node.body, stub, f"{prefix}{node.name}.")


def public(name):
    return not any(part.startswith("_") for part in name.split("."))


def decorator_names(node):
    """`@x.setter`, `@typing.overload`, `@functools.lru_cache()` -> setter, overload, lru_cache."""
    names = []
    for d in node.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        names.append(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
    return names


def is_accessor(node):
    """A property's setter or deleter: it shares the getter's name, not its return type."""
    return bool({"setter", "deleter"} & set(decorator_names(node)))


# ----------------------------------------------------------------------------- labels from stubs

# The 12 classes, by the name an annotation starts with. What is not here is "other": Any,
# object, Self, TypeVars (AnyStr too), classes (NamedTuples such as os.stat_result as well),
# type[...], Callable, set, NoReturn. The lines drawn, and why:
# - dict is dict and its subclasses (Dict, OrderedDict, defaultdict): what isinstance(x, dict)
#   holds for. Mapping and MutableMapping are interfaces, often met by a read-only view or a
#   class of the module's own, so they are "other" (11 returns in all of typeshed), as are
#   Sequence for list and NamedTuple classes for tuple.
# - Iterator is whatever is consumed by iterating: Iterator, Generator, Iterable and their async
#   forms. A generator function (a `yield`) is the typical source, and stubs say any of these.
# - bool takes TypeGuard[X] and TypeIs[X] (bools at run time); str takes LiteralString.
# - Literal[...] is the class of its values ("r" and "w" are str); mixed values are "other".
_CLASS_OF_NAME = {
    "None": "None", "str": "str", "LiteralString": "str", "bool": "bool", "TypeGuard": "bool",
    "TypeIs": "bool", "int": "int", "float": "float", "bytes": "bytes", "tuple": "tuple",
    "Tuple": "tuple", "list": "list", "List": "list", "dict": "dict", "Dict": "dict",
    "OrderedDict": "dict", "defaultdict": "dict", "Iterator": "Iterator",
    "Generator": "Iterator", "Iterable": "Iterator", "AsyncIterator": "Iterator",
    "AsyncGenerator": "Iterator", "AsyncIterable": "Iterator"}
_CLASS_OF_VALUE = {"NoneType": "None", "bool": "bool", "int": "int", "float": "float", "str": "str",
                   "bytes": "bytes"}  # a constant's class by its type's name


def last_name(node):
    """`Iterator`, `typing.Iterator`, `collections.abc.Iterator` -> "Iterator"; else None."""
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)


def union(classes):
    """One class for `A | B | ...`: Optional when None is one of several members, the members'
    class when they agree (`str | LiteralString`), else other (`str | bytes`)."""
    classes = set(classes)
    if classes & {"None", "Optional"} and classes != {"None"}:
        return "Optional"
    return classes.pop() if len(classes) == 1 else "other"


def collapse(node, aliases=None, seen=()):
    """The class (one of CLASSES) of a return annotation. aliases: the stub's own type aliases
    (`_Reply: TypeAlias = tuple[int, str]`), followed to what they stand for. `X | None`,
    `Optional[X]` and `Union[X, None]` are all Optional."""
    aliases = aliases or {}
    if isinstance(node, ast.Constant):  # None, or a quoted annotation
        if isinstance(node.value, str):
            return collapse(ast.parse(node.value, mode="eval").body, aliases, seen)
        return "None" if node.value is None else "other"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return union([collapse(node.left, aliases, seen), collapse(node.right, aliases, seen)])
    if isinstance(node, ast.Subscript):
        head = last_name(node.value)
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head == "Optional":
            return "Optional"
        if head == "Union":
            return union(collapse(a, aliases, seen) for a in args)
        if head == "Literal":
            return union(_CLASS_OF_VALUE.get(type(a.value).__name__, "other")
                         if isinstance(a, ast.Constant) else "other" for a in args)
        if head == "Annotated":
            return collapse(args[0], aliases, seen)
        return _CLASS_OF_NAME.get(head, "other")  # tuple[int, str] -> tuple
    name = last_name(node)
    if name in aliases and name not in seen:
        return collapse(aliases[name], aliases, seen + (name,))
    return _CLASS_OF_NAME.get(name, "other")


def stub_returns(text):
    """(labels, left_out) of a stub's source text: labels maps each public function's qualified
    name to its class; left_out counts the public functions without one, by reason. Overloads,
    and definitions in branches condition() cannot decide, keep their class when all agree and
    are left out when they differ (os.fspath returns str for a str, bytes for bytes: no single
    right answer). Property setters and deleters are not read."""
    tree = ast.parse(text)
    aliases = {}
    for node in live(tree.body, stub=True):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            aliases[last_name(node.targets[0])] = node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            aliases[last_name(node.target)] = node.value
    returns = defaultdict(list)
    for name, node in defs(tree.body, stub=True):
        if public(name) and not is_accessor(node):
            returns[name].append(node.returns)
    labels, left_out = {}, Counter()
    for name, annotations in returns.items():
        if None in annotations:
            left_out["no return type in the stub"] += 1
            continue
        classes = {collapse(a, aliases) for a in annotations}
        if len(classes) > 1:
            left_out["overloads disagree"] += 1
        else:
            labels[name] = classes.pop()
    return labels, left_out


def typeshed_stdlib():
    """The stdlib stubs of the typeshed that jedi bundles; ValueError without jedi."""
    try:
        import jedi  # only for the directory of its typeshed; jedi itself never runs
    except ImportError:
        raise ValueError("the labels come from jedi's bundled typeshed: pip install jedi==0.20.0")
    root = Path(jedi.__file__).parent / "third_party" / "typeshed" / "stdlib"
    if not root.is_dir():
        raise ValueError(f"jedi {jedi.__version__} has no bundled typeshed at {root}")
    return root, jedi.__version__


# ----------------------------------------------------------------------------- examples from source

def strip_annotations(lines, node):
    """The source of a def (lines: the file's lines as bytes, since ast columns count UTF-8
    bytes) from its first decorator on, dedented, with the annotations of its parameters and
    its `-> X` cut out, those of the defs nested inside it too. `def f(x: int = 1) -> str:`
    becomes `def f(x = 1):`."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    code = b"".join(lines[first - 1:node.end_lineno])
    starts = np.cumsum([0] + [len(line) for line in lines[first - 1:node.end_lineno]])

    def at(lineno, col):
        return int(starts[lineno - first]) + col

    spans = []  # (start, end) byte offsets in code
    for f in ast.walk(node):
        if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = f.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is not None and arg.annotation is not None:  # from the name's end: `x: int`
                spans.append((at(arg.lineno, arg.col_offset) + len(arg.arg.encode()),
                              at(arg.annotation.end_lineno, arg.annotation.end_col_offset)))
        if f.returns is not None:  # from the end of `)`, before the arrow: `) -> int`
            arrow = code.rindex(b"->", 0, at(f.returns.lineno, f.returns.col_offset))
            spans.append((len(code[:arrow].rstrip()),
                          at(f.returns.end_lineno, f.returns.end_col_offset)))
    for start, end in sorted(spans, reverse=True):  # from the back: earlier offsets hold
        code = code[:start] + code[end:]
    # Dedent by the def's own indent. textwrap.dedent would give up on a method whose docstring
    # or continued line starts further left than the def (2% of them), leaving it indented.
    indent = lines[first - 1][:len(lines[first - 1]) - len(lines[first - 1].lstrip())].decode()
    return "".join(line[len(indent):] if line.startswith(indent) else line
                   for line in code.decode().splitlines(keepends=True))


def has_annotations(node):
    """Whether any def in node still has a parameter or return annotation."""
    for f in ast.walk(node):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and (f.returns or any(
                a.annotation for a in ast.walk(f.args) if isinstance(a, ast.arg))):
            return True
    return False


def cut_cleanly(text):
    """Whether stripped code still parses and holds no annotation: an example must never keep
    its answer (`x: (int)`, with parentheses outside the node's span, would fail here)."""
    try:
        return not has_annotations(ast.parse(text))
    except SyntaxError:
        return False


def source_functions(text):
    """qualified name -> {"text", "line"} of the public functions and methods of a source
    file (strip_annotations' text; line of the first decorator or the def), and how many
    names were defined more than once (platform variants, fallbacks: the first one is kept).
    None if the file does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None, 0
    lines = [line.encode() for line in text.splitlines(keepends=True)]
    found, repeated = {}, 0
    for name, node in defs(tree.body, stub=False):
        if not public(name) or is_accessor(node):
            continue
        if name in found:
            repeated += 1
            continue
        found[name] = {"text": strip_annotations(lines, node),
                       "line": min([node.lineno] + [d.lineno for d in node.decorator_list])}
    return found, repeated


def module_name(relative):
    """`email/message.py` -> email.message, `os/__init__.pyi` -> os (stub and source agree
    even where one is a package and the other a module: zipfile/__init__.pyi, zipfile.py)."""
    parts = list(Path(relative).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def build_examples(stub_root, source_root, source_files, val_files):
    """(examples, counts): one example per stub-labelled public function that has its
    implementation in source_files (paths under source_root); val_files (paths relative to
    source_root) and LEFT_OUT parts are not read. Each example: {"module", "name", "label",
    "text", "file", "line"}. counts says what was left out and why."""
    stubs = {module_name(p.relative_to(stub_root)): p
             for p in sorted(Path(stub_root).rglob("*.pyi"))}
    val_files = set(val_files)
    examples, counts = [], Counter()
    for path in source_files:
        relative = Path(path).relative_to(source_root).as_posix()
        module = module_name(relative)
        if LEFT_OUT & set(Path(relative).parts):
            counts["files in test/, idlelib, lib2to3, encodings"] += 1
        elif relative in val_files:
            counts["files in prepare.py's val split"] += 1
        elif module not in stubs:
            counts["files without a stub"] += 1
        else:
            labels, left_out = stub_returns(stubs[module].read_text(encoding="utf-8"))
            counts.update(left_out)
            functions, repeated = source_functions(Path(path).read_text(encoding="utf-8"))
            if functions is None:
                counts["files that do not parse"] += 1
                continue
            counts["source functions defined twice (first kept)"] += repeated
            for name, label in labels.items():
                if name not in functions:  # written in C, or imported from elsewhere
                    counts["stub functions without a def in the source"] += 1
                    continue
                text = functions[name]["text"]
                if not cut_cleanly(text):
                    counts["annotations the cutting missed or broke"] += 1
                    continue
                examples.append({"module": module, "name": name, "label": label, "text": text,
                                 "file": relative, "line": functions[name]["line"]})
    return examples, counts


def stdlib_split(data_dir):
    """(root, files, val, where) of this Python's stdlib as prepare.py reads it: its root, every
    file, the val files (relative to root) and where that split came from: prepare.py's output
    in data_dir, or, where there is none, prepare.py's default split worked out again with its
    own functions. ValueError for a data_dir prepared from another corpus."""
    files, source = prepare.stdlib_files()
    root = Path(os.path.commonpath([os.path.abspath(p.parent) for p in files]))  # as prepare.py
    if (Path(data_dir) / "meta.json").exists():
        meta = prepare.load_meta(data_dir)
        if meta.get("source") != source:
            raise ValueError(f"{data_dir} was prepared from {meta.get('source')}, "
                             f"not from {source}")
        val = prepare.split_files(data_dir)[1]
        where = f"{data_dir}/meta.json"
    else:
        docs, paths, _ = prepare.read_documents(files)
        chosen = prepare.val_indices([len(d) for d in docs], prepare.VAL_FRACTION,
                                     prepare.VAL_CHARS, PREPARE_SEED)
        val = [paths[i] for i in sorted(chosen)]
        where = f"prepare.py's default split, worked out again ({data_dir} has no meta.json)"
    return root, files, [Path(os.path.abspath(p)).relative_to(root).as_posix() for p in val], where


# ----------------------------------------------------------------------------- splits

def split_by_module(examples, seed, test_min, dev_min):
    """{"train", "dev", "test"} -> examples (in their order), split by module: the modules in a
    seeded random order fill test until it holds test_min functions, then dev until dev_min,
    and the rest is train. ValueError when there are too few for all three."""
    size = Counter(e["module"] for e in examples)
    modules = sorted(size)
    random.Random(seed).shuffle(modules)
    split_of, filled = {}, Counter()
    for module in modules:
        split = ("test" if filled["test"] < test_min else "dev" if filled["dev"] < dev_min
                 else "train")
        split_of[module] = split
        filled[split] += size[module]
    if filled["test"] < test_min or filled["dev"] < dev_min or not filled["train"]:
        raise ValueError(f"{len(examples)} functions in {len(modules)} modules are too few for "
                         f"{test_min} test and {dev_min} dev functions and a train split")
    return {split: [e for e in examples if split_of[e["module"]] == split]
            for split in ("train", "dev", "test")}


# ----------------------------------------------------------------------------- metrics

def accuracy(gold, pred):
    return float(np.mean(np.asarray(gold) == np.asarray(pred)))


def macro_f1(gold, pred):
    """Mean F1 over the classes in gold or pred (sklearn's f1_score(average="macro")): a rare
    class counts as much as None, so a system that never predicts it pays for that."""
    return f1_of_codes(*class_codes(gold, pred))


def class_codes(gold, pred):
    """gold and pred as integer codes 0..k-1 of the classes found in either, and k."""
    classes, codes = np.unique(np.concatenate([np.asarray(gold), np.asarray(pred)]),
                               return_inverse=True)
    return codes[:len(gold)], codes[len(gold):], len(classes)


def f1_of_codes(gold, pred, k):
    """macro_f1 on integer codes: counts per class by bincount, ~100x faster than comparing
    strings once per class, which a bootstrap of 10,000 resamples needs."""
    tp = np.bincount(gold[gold == pred], minlength=k)
    n_gold, n_pred = np.bincount(gold, minlength=k), np.bincount(pred, minlength=k)
    found = n_gold + n_pred > 0  # a class of neither (dropped by a resample) does not count
    return float(np.mean(2 * tp[found] / (n_gold + n_pred)[found]))  # F1 = 2TP / (2TP + FP + FN)


def resamples(n_items, n, seed):
    """n bootstrap resamples of n_items test items: index arrays drawn with replacement. The
    same seed gives the same resamples, so systems scored with it are paired item by item."""
    if n_items < 1 or n < 1:
        raise ValueError(f"a bootstrap needs at least one item and one resample, "
                         f"got {n_items} and {n}")
    rng = np.random.default_rng(seed)
    return (rng.integers(0, n_items, n_items) for _ in range(n))


def bootstrap_interval(correct, n=DEFAULTS["bootstrap"], seed=0):
    """The 95% percentile-bootstrap interval (low, high) of an accuracy, from 0/1 per item."""
    correct = np.asarray(correct, dtype=float)
    values = [correct[i].mean() for i in resamples(len(correct), n, seed)]
    return tuple(float(v) for v in np.percentile(values, [2.5, 97.5]))


def paired_bootstrap(a_correct, b_correct, n=DEFAULTS["bootstrap"], seed=0):
    """The 95% interval (low, high) of accuracy(a) - accuracy(b) on the same test items: each
    resample draws items, and both systems are scored on those same items. It excludes 0 when
    the difference is more than resampling noise."""
    a, b = np.asarray(a_correct, dtype=float), np.asarray(b_correct, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired systems need the same test items, got {len(a)} and {len(b)}")
    values = [a[i].mean() - b[i].mean() for i in resamples(len(a), n, seed)]
    return tuple(float(v) for v in np.percentile(values, [2.5, 97.5]))


def f1_interval(gold, pred, n=DEFAULTS["bootstrap"], seed=0):
    """The 95% percentile-bootstrap interval (low, high) of macro-F1."""
    gold, pred, k = class_codes(gold, pred)
    values = [f1_of_codes(gold[i], pred[i], k) for i in resamples(len(gold), n, seed)]
    return tuple(float(v) for v in np.percentile(values, [2.5, 97.5]))


def scores(gold, pred, n, seed):
    """Every number of one system on test: accuracy and macro-F1, each with its interval."""
    correct = np.asarray(gold) == np.asarray(pred)
    return {"accuracy": accuracy(gold, pred), "accuracy_ci": bootstrap_interval(correct, n, seed),
            "macro_f1": macro_f1(gold, pred), "macro_f1_ci": f1_interval(gold, pred, n, seed)}


# ----------------------------------------------------------------------------- baselines

def own_nodes(node):
    """The nodes of a function's body, without those of the functions, lambdas and classes
    defined inside it (their returns and yields are not the function's)."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            yield child
            yield from own_nodes(child)


def returned_class(value):
    """What a `return <value>` returns, by its look: a literal, a display, a comparison, a call
    of a builtin; "other" when the look says nothing."""
    if isinstance(value, ast.Constant):
        return _CLASS_OF_VALUE.get(type(value.value).__name__, "other")
    calls = {"str": "str", "repr": "str", "format": "str", "join": "str", "bool": "bool",
             "isinstance": "bool", "int": "int", "len": "int", "float": "float", "list": "list",
             "sorted": "list", "tuple": "tuple", "dict": "dict", "bytes": "bytes",
             "encode": "bytes"}
    if isinstance(value, ast.Call):
        return calls.get(last_name(value.func), "other")
    kinds = {ast.JoinedStr: "str", ast.Compare: "bool", ast.Tuple: "tuple", ast.List: "list",
             ast.ListComp: "list", ast.Dict: "dict", ast.DictComp: "dict"}
    if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.Not):
        return "bool"
    if isinstance(value, ast.BinOp) and isinstance(value.op, ast.Mod):  # "..." % args
        return returned_class(value.left) if isinstance(value.left, ast.Constant) else "other"
    return kinds.get(type(value), "other")


def ast_rule(text):
    """The class a reader guesses from a function's own returns and yields: a yield makes an
    Iterator, no `return <value>` None, `return None` beside other values Optional, and
    otherwise the class of the first return whose look says one (returned_class). Its rules
    were written looking at train and dev, never at test."""
    node = ast.parse(text).body[0]
    own = list(own_nodes(node))
    if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in own):
        return "other" if "contextmanager" in decorator_names(node) else "Iterator"
    values = [n.value for n in own if isinstance(n, ast.Return) and n.value is not None]
    classes = [returned_class(v) for v in values]
    if not values or set(classes) == {"None"}:
        return "None"
    if "None" in classes:
        return "Optional"
    return next((c for c in classes if c != "other"), "other")


IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")  # HTTPServer -> HTTP, Server


def words(text):
    """The bag of words TF-IDF counts: every identifier and word (keywords too: return, yield,
    None), lowercased, and the parts of those made of several (get_cwd, isDir -> get, cwd, is,
    dir). Docstring words are identifiers too."""
    found = []
    for identifier in IDENTIFIER.findall(text):
        parts = PART.findall(identifier)
        found += [identifier.lower()] + ([p.lower() for p in parts] if len(parts) > 1 else [])
    return found


def tfidf_logreg(splits, c_grid=C_GRID):
    """(test predictions, C, dev accuracy per C) of logistic regression on TF-IDF of words():
    fitted on train for each C, C chosen by dev accuracy (test plays no part), predictions of
    the model with that C."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    vectorizer = TfidfVectorizer(analyzer=words, sublinear_tf=True, min_df=2)
    x = {"train": vectorizer.fit_transform([e["text"] for e in splits["train"]])}
    x |= {s: vectorizer.transform([e["text"] for e in splits[s]]) for s in ("dev", "test")}
    y = {s: [e["label"] for e in splits[s]] for s in splits}
    models, dev_accuracy = {}, {}
    for c in c_grid:
        # saga: 0.2-3 s a fit here, lbfgs 6-18 s for the same dev accuracy (measured, 2 cores)
        # (saga samples the rows: random_state fixes its order, so a rerun gives the same numbers)
        model = LogisticRegression(C=c, solver="saga", max_iter=5000, random_state=0)
        models[c] = model.fit(x["train"], y["train"])
        dev_accuracy[c] = accuracy(y["dev"], models[c].predict(x["dev"]))
    best = max(c_grid, key=lambda c: (dev_accuracy[c], -c))  # a tie goes to the simpler model
    return list(models[best].predict(x["test"])), best, dev_accuracy


# ----------------------------------------------------------------------------- data, table, main

def load_data(data_dir, seed, test_min, dev_min):
    """(splits, info): the examples split by module (split_by_module), and what a report needs
    about them: sources, versions, what was left out, counts per split and class, modules."""
    stub_root, jedi_version = typeshed_stdlib()
    root, files, val, where = stdlib_split(data_dir)
    examples, left_out = build_examples(stub_root, root, files, val)
    splits = split_by_module(examples, seed, test_min, dev_min)
    train_texts = {e["text"] for e in splits["train"]}
    info = {"python": sys.version.split()[0], "jedi": jedi_version, "typeshed": str(stub_root),
            "stdlib": str(root), "val_split": where, "val_files_left_out": sorted(val),
            "functions": len(examples), "modules": len({e["module"] for e in examples}),
            "left_out": dict(left_out),
            "classes": {s: dict(Counter(e["label"] for e in splits[s])) for s in splits},
            "split_modules": {s: sorted({e["module"] for e in splits[s]}) for s in splits},
            # trivial code in two modules (`return self._name`): kept, and counted
            "test_texts_also_in_train": sum(e["text"] in train_texts for e in splits["test"]),
            "test_items": [f"{e['module']}:{e['name']}" for e in splits["test"]]}
    return splits, info


def baselines(splits, n_bootstrap, seed):
    """{"majority", "ast_rule", "tfidf"} -> {"system": its name in the table, the scores on test
    (scores()), "predictions": one class per test item}, and what TF-IDF chose on dev."""
    gold = [e["label"] for e in splits["test"]]
    majority = Counter(e["label"] for e in splits["train"]).most_common(1)[0][0]
    tfidf, c, dev_accuracy = tfidf_logreg(splits)
    systems = {"majority": (f"majority class of train ({majority})", [majority] * len(gold)),
               "ast_rule": ("AST rule (returns and yields)",
                            [ast_rule(e["text"]) for e in splits["test"]]),
               "tfidf": (f"TF-IDF + logistic regression (C={c:g}, chosen on dev)", tfidf)}
    rows = {key: {"system": name, **scores(gold, pred, n_bootstrap, seed), "predictions": pred}
            for key, (name, pred) in systems.items()}
    return rows, {"C": c, "dev_accuracy": {f"{k:g}": v for k, v in dev_accuracy.items()}}


def markdown_table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def percent(value):
    return f"{100 * value:.1f}"


def results_table(rows):
    """The markdown table of systems on test: accuracy and macro-F1 in %, each with its 95%
    bootstrap interval."""
    def ci(low_high):
        return "{}-{}".format(*map(percent, low_high))
    return markdown_table(["system (test)", "accuracy %", "95% CI", "macro-F1 %", "95% CI"],
                          [[r["system"], percent(r["accuracy"]), ci(r["accuracy_ci"]),
                            percent(r["macro_f1"]), ci(r["macro_f1_ci"])] for r in rows.values()])


def data_summary(info):
    """The data part of the report: sizes, what was left out, classes per split, test modules."""
    splits, total = info["classes"], Counter()
    for counts in splits.values():
        total.update(counts)
    n = {s: sum(counts.values()) for s, counts in splits.items()}
    rows = [[c, *(splits[s].get(c, 0) for s in splits), total[c],
             percent(total[c] / info["functions"])] for c in CLASSES]
    rows.append(["all", *n.values(), info["functions"], "100.0"])
    rows.append(["modules", *(len(info["split_modules"][s]) for s in splits), info["modules"], ""])
    left_out = sorted(info["left_out"].items())
    lines = [f"{info['functions']:,} public functions and methods with a stub return type, in "
             f"{info['modules']} modules (python {info['python']}, jedi {info['jedi']}'s typeshed)",
             f"val split: {info['val_split']}; test functions whose exact text is also in "
             f"train: {info['test_texts_also_in_train']}",
             "left out: " + "; ".join(f"{k} {v:,}" for k, v in left_out), "",
             markdown_table(["class", *splits, "all", "% of all"], rows), "",
             f"test modules ({len(info['split_modules']['test'])}): "
             + ", ".join(info["split_modules"]["test"])]
    return "\n".join(lines)
