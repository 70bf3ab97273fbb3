"""The house plan, checked on the source: which part may import which, read from the
import statements of every module (the floors go up, never down), what main.py takes
from training.py, and what the installed library takes of utils/. docs/architecture.md
states the same table in words: it is read here and must agree."""
import ast
import functools
import os
import re

from helpers import REPO

# What each part of the program may import of the repository's own parts (its own modules
# aside). The library's parts (optim, models, utils) import nothing above them; models read
# and write files with utils. docs/architecture.md gives the reason of every "never".
ALLOWED = {
    "optim": set(),
    "utils": set(),
    "models": {"utils"},
    "data": {"utils"},
    "config": {"data", "models"},
    "engine": {"optim", "utils"},
    "checkpoint": {"config", "optim", "utils"},
    "factory": {"checkpoint", "config", "data", "models", "optim", "utils"},
    "training": {"checkpoint", "config", "data", "engine", "factory", "optim", "utils"},
    "evaluate": {"config", "data", "engine", "factory", "models", "optim", "utils"},
    "main": {"config", "data", "evaluate", "training", "utils"},
    "run_seeds": {"checkpoint", "config", "data", "utils"},
    "src/vispa": {"models", "optim", "utils"},
    "examples": {"src/vispa"},
    "experiments": {"config", "data", "engine", "factory", "utils"},
    "speed": {"config", "data", "engine", "factory", "models", "optim", "utils"},
}
OURS = set(ALLOWED)
# The name a part is imported by, where it is not the part's own: the installed library's face.
IMPORTED_AS = {"vispa": "src/vispa"}
# What is not a part of the program: the tests, and the folders of data and outputs.
NOT_PARTS = {"tests", "results", "datasets", "pretrained", "build"}
LIBRARY = ("optim", "models", "src/vispa")  # what `pip install .` ships, with utils/files.py alone


def sources(part):
    """The Python files of ``part``: a module (``main.py``) or a folder (``data/``, ``src/vispa/``)."""
    path = os.path.join(REPO, part)
    if os.path.isfile(path + ".py"):
        return [path + ".py"]
    return sorted(os.path.join(where, name) for where, folders, names in os.walk(path)
                  for name in names if name.endswith(".py") and "__pycache__" not in where)


def _imported_part(name, level, part, file):
    """The part that the module ``name`` (its first component; None for ``from . import``)
    imported by ``file`` of ``part`` belongs to: the part itself for its own modules."""
    folder = os.path.dirname(file)
    own = name is None or (os.path.isdir(os.path.join(REPO, part)) and
                           (os.path.isfile(os.path.join(folder, name + ".py")) or
                            os.path.isdir(os.path.join(folder, name))))
    if level == 1 and own or level == 0 and own and name is not None:
        return part
    return IMPORTED_AS.get(name, name)


@functools.cache
def modules():
    """{part: [(file, imported part, module, names)]} for every module of the program: the
    module as written (``utils.files``), the names taken from it (None for ``import x``)."""
    found = {}
    for part in ALLOWED:
        for file in sources(part):
            with open(file) as f:
                tree = ast.parse(f.read(), file)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        top = alias.name.split(".")[0]
                        found.setdefault(part, []).append((file, _imported_part(top, 0, part, file), alias.name, None))
                elif isinstance(node, ast.ImportFrom):
                    top = node.module.split(".")[0] if node.module else None
                    found.setdefault(part, []).append((file, _imported_part(top, node.level, part, file),
                                                       node.module, [a.name for a in node.names]))
    return found


def test_every_part_imports_only_the_parts_below_it():
    wrong = [f"{os.path.relpath(file, REPO)} imports {imported}" for part, imports in modules().items()
             for file, imported, _, _ in imports if imported in OURS and imported != part
             and imported not in ALLOWED[part]]
    assert not wrong, wrong


def test_the_parts_import_each_other_without_a_cycle():
    graph = {part: {imported for _, imported, _, _ in imports if imported in OURS and imported != part}
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
    assert not [os.path.relpath(file, REPO) for imports in found.values() for file, imported, _, _ in imports
                if imported == "main"]
    taken = {name for file, imported, _, names in found["main"] if imported == "training" for name in names or ()}
    assert taken <= {"train", "Request", "NEW", "RESUME", "REWIND", "FORK"}, taken


def test_the_library_takes_of_utils_only_files_py():
    """`pip install .` ships utils/files.py alone beside optim/ and models/ (pyproject.toml)."""
    found = modules()
    wrong = [f"{os.path.relpath(file, REPO)}: {module} {names or ''}" for part in LIBRARY
             for file, imported, module, names in found[part] if imported == "utils"
             and not (module.endswith("utils.files") or (module.endswith("utils") and names == ["files"]))]
    assert not wrong, wrong


def test_every_module_of_the_repository_belongs_to_a_part():
    parts = set()
    for name in os.listdir(REPO):
        path = os.path.join(REPO, name)
        if name.startswith(".") or name in NOT_PARTS or name.endswith(".egg-info"):
            continue
        if name.endswith(".py") and os.path.isfile(path):
            parts.add(name[:-3])
        elif os.path.isdir(path) and name != "src" and any(n.endswith(".py") for _, _, ns in os.walk(path) for n in ns):
            parts.add(name)
    source = os.path.join(REPO, "src")
    parts |= {f"src/{name}" for name in os.listdir(source) if os.path.isdir(os.path.join(source, name))
              and name != "__pycache__" and not name.endswith(".egg-info")}
    assert parts == OURS, (sorted(parts - OURS), sorted(OURS - parts))


def test_the_readmes_layout_names_every_module():
    """A newcomer finds every module in the README's Layout, by its file name."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)]
    unnamed = [os.path.relpath(file, REPO) for part in ALLOWED for file in sources(part)
               if os.path.basename(file) != "__init__.py" and os.path.basename(file) not in layout]
    assert not unnamed, f"modules the README's Layout does not name: {unnamed}"


def heading_anchors(markdown):
    """The anchors of a Markdown file's headings, as GitHub makes them."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", markdown, re.M)}


def test_every_link_of_the_readme_and_the_docs_leads_somewhere():
    pages = ["README.md", "speed/README.md"] + [os.path.join("docs", n) for n in os.listdir(os.path.join(REPO, "docs"))
                                                if n.endswith(".md")]
    broken = []
    for page in pages:
        with open(os.path.join(REPO, page)) as f:
            text = f.read()
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if link.startswith(("http://", "https://")):
                continue
            path, _, anchor = link.partition("#")
            target = os.path.normpath(os.path.join(REPO, os.path.dirname(page), path)) if path else \
                os.path.join(REPO, page)
            if not os.path.exists(target):
                broken.append(f"{page}: {link} (no such file)")
            elif anchor and target.endswith(".md"):
                with open(target) as f:
                    if anchor not in heading_anchors(f.read()):
                        broken.append(f"{page}: {link} (no such heading)")
    assert not broken, broken


# ---- the same table in words ------------------------------------------------------------------------

ROW = re.compile(r"^\| `(?P<part>[^`]+)` \| (?P<allowed>[^|]*) \|")


def documented():
    """{part: the parts it may import} from the table of docs/architecture.md."""
    with open(os.path.join(REPO, "docs", "architecture.md")) as f:
        text = f.read()
    table = text[text.index("<!-- house plan -->"):text.index("<!-- end of the house plan -->")]
    return {m["part"].rstrip("/"): set(re.findall(r"`([^`]+)`", m["allowed"]))
            for m in map(ROW.match, table.splitlines()) if m}


def test_the_house_plan_in_the_docs_is_this_table():
    assert documented() == ALLOWED
