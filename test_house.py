"""The repository's layout, as the README's file table promises it: shared code on a floor below
the scripts, no file importing a file that imports it back, no test file importing another."""
import ast
import glob
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def project_imports(path):
    """The project's own modules that a file imports, at the top or inside a function."""
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))}
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & modules


def test_no_import_circles_and_scripts_stand_on_the_floor():
    files = [p for p in glob.glob(os.path.join(HERE, "*.py"))
             if not os.path.basename(p).startswith(("test_", "conftest"))]
    edges = {os.path.basename(p)[:-3]: project_imports(p) for p in files}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,)))
                   for n in edges.get(a, ()))

    assert not [(a, b) for a in edges for b in edges[a] if reaches(b, a)]
    for script in ("sample", "finetune", "bench", "runtime", "codesearch"):
        assert script == "finetune" or "train" not in edges[script], script
    assert not edges["hf_format"]  # it imports nothing of the project
    assert edges["finetune"] & {"sample", "train"} == {"train"}  # the optimizer, nothing else
    assert "sample" not in {m for deps in edges.values() for m in deps}  # no script imports it


def test_no_test_file_imports_another():
    for path in glob.glob(os.path.join(HERE, "test_*.py")):
        assert not {m for m in project_imports(path) if m.startswith(("test_", "conftest"))}, path
