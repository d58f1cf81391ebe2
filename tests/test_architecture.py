"""The package's module structure: no import circles, no private names imported across modules."""

import ast
import re
from pathlib import Path

import dspark_hf

PACKAGE = Path(dspark_hf.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports() -> dict[str, list[tuple[str, list[str]]]]:
    """Per module of dspark_hf: every import of another dspark_hf module anywhere in its body (module level,
    inside functions, under TYPE_CHECKING), as (module imported, names imported from it)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    imports: dict[str, list[tuple[str, list[str]]]] = {name: [] for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imports[name] += [(a.name, []) for a in node.names if a.name.startswith("dspark_hf")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    source = f"{base}.{node.module}" if node.module else base
                elif node.module and node.module.startswith("dspark_hf"):
                    source = node.module
                else:
                    continue
                names = [a.name for a in node.names]
                # `from . import x` imports the submodule x when there is one.
                submodules = [f"{source}.{n}" for n in names if f"{source}.{n}" in modules]
                imports[name] += [(m, []) for m in submodules] or [(source, names)]
    return imports


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in deps if m != name} for name, deps in _package_imports().items()}


def test_the_import_graph_is_acyclic():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                cycle = path[path.index(dep) :] + [dep] if dep in path else [module, dep]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_imports_the_package_root():
    """Importing `dspark_hf` itself from inside would close a circle through `__init__`."""
    offenders = [name for name, deps in _graph().items() if name != "dspark_hf" and "dspark_hf" in deps]
    assert offenders == []


def test_no_private_names_cross_modules():
    private = [
        f"{name} imports {n} from {source}"
        for name, deps in _package_imports().items()
        for source, names in deps
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert private == []


def test_no_private_attributes_of_other_modules():
    """`module._name` reaches into another module as surely as `from module import _name`."""
    modules = {name.rpartition(".")[2] for name in _graph()}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offenders.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert offenders == []


def _readme_layout() -> list[str]:
    """The package paths the README's Layout section lists: `name.py` at the root, `sub/` for a subpackage
    and `sub/name.py` for its modules (indented under it)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout") :].split("```")[1]
    listed, subpackage = [], ""
    for line in layout.splitlines():
        entry = re.match(r"^(  |    )(\w+\.py|\w+/)(?: |$)", line)
        if entry is None:
            continue
        indent, name = entry.groups()
        if len(indent) == 2:
            subpackage = name if name.endswith("/") else ""
            listed.append(name)
        else:
            listed.append(subpackage + name)
    return listed


def test_the_readme_layout_lists_every_module_and_subpackage():
    """Every module, subpackage and data folder of the package, each once (a subpackage by its folder)."""
    modules = [path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")]
    modules = [m if m == "__init__.py" else m.removesuffix("__init__.py") for m in modules]
    folders = [f"{path.name}/" for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"]
    assert sorted(_readme_layout()) == sorted(set(modules) | set(folders))


def test_no_module_reexports_another_modules_names():
    """Each public name has one home: a module's `__all__` lists only what it defines itself. The package root
    is the one place that gathers the public API."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        defined, exported = set(), []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
                if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                    exported = [ast.literal_eval(e) for e in node.value.elts]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined.add(node.target.id)
        offenders += [f"{path.relative_to(PACKAGE)}: {n}" for n in exported if n not in defined]
    assert offenders == []
