"""The house plan, checked on the source: which part may import which, read from the
import statements of every module (the floors go up, never down), and what main.py takes
from training.py."""
import ast
import os

from helpers import REPO

# What each part of the program may import of the repository's own parts. The library's
# parts (optim, models, utils) import nothing above them; models read files with utils.
ALLOWED = {
    "optim": set(),
    "utils": {"utils"},
    "models": {"models", "utils"},
    "data": {"data", "utils"},
    "config": {"data", "models"},
    "engine": {"optim", "utils"},
    "checkpoint": {"config", "optim", "utils"},
    "factory": {"checkpoint", "config", "data", "models", "optim", "utils"},
    "training": {"checkpoint", "config", "data", "engine", "factory", "optim", "utils"},
    "run_seeds": {"checkpoint", "config", "data", "utils"},
    "evaluate": {"config", "data", "engine", "factory", "models", "optim", "utils"},
    "main": {"config", "data", "evaluate", "training", "utils"},
}
OURS = set(ALLOWED)


def modules():
    """{part: [(file, imported part, names)]} for every module of the program."""
    found = {}
    for part in ALLOWED:
        path = os.path.join(REPO, part)
        files = [path + ".py"] if os.path.isfile(path + ".py") else [
            os.path.join(path, name) for name in sorted(os.listdir(path)) if name.endswith(".py")]
        for file in files:
            tree = ast.parse(open(file).read(), file)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        found.setdefault(part, []).append((file, alias.name.split(".")[0], None))
                elif isinstance(node, ast.ImportFrom):
                    top = part if node.level == 1 else (node.module or "").split(".")[0]
                    if node.level > 1:  # the library's way from models/ up to utils/ (installed as vispa)
                        top = (node.module or "").split(".")[0]
                    found.setdefault(part, []).append((file, top, [a.name for a in node.names]))
    return found


def test_every_part_imports_only_the_parts_below_it():
    wrong = [f"{os.path.relpath(file, REPO)} imports {imported}" for part, imports in modules().items()
             for file, imported, _ in imports if imported in OURS and imported != part
             and imported not in ALLOWED[part]]
    assert not wrong, wrong


def test_the_parts_import_each_other_without_a_cycle():
    graph = {part: {imported for _, imported, _ in imports if imported in OURS and imported != part}
             for part, imports in modules().items()}
    done, path = set(), []

    def visit(part):
        assert part not in path, " -> ".join(path + [part])
        if part in done:
            return
        path.append(part)
        for other in graph.get(part, ()):
            visit(other)
        path.pop()
        done.add(part)

    for part in graph:
        visit(part)


def test_nothing_imports_main_and_main_takes_only_the_runs_entry_from_training():
    found = modules()
    assert not [file for imports in found.values() for file, imported, _ in imports if imported == "main"]
    taken = {name for file, imported, names in found["main"] if imported == "training" for name in names or ()}
    assert taken <= {"train", "Request", "NEW", "RESUME", "REWIND", "FORK"}, taken
