"""Reads every import in pibake's packages from the source (ast; imports inside functions included) and
checks the layers of docs/ARCHITECTURE (tests/test_layers.py). ``python -m tests.layers`` prints the numbers:
the largest modules and how many function-local imports remain, by module."""

import ast
import configparser
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports: a module, or the package a name comes from
    line: int
    local: bool  # inside a function: runs when called, not when the module loads
    text: str  # the source line (for messages and reasons)


def package_dirs():
    """{package: folder} from setup.cfg's package_dir (pibake.bake = bake, ...)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pairs = [line.split("=") for line in cfg["options"]["package_dir"].strip().splitlines()]
    return {name.strip(): ROOT / folder.strip() for name, folder in pairs}


def modules():
    """{module name: path} of every module of the distribution (folders without __init__.py, such as
    pibake/deploy/remote, hold programs for other machines, not modules)."""
    out = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder)
            if not all((folder / Path(*rel.parts[:i]) / "__init__.py").exists() for i in range(len(rel.parts))):
                continue
            parts = [package, *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out.setdefault(".".join(parts), path)
    return out


def imports_of(module, path, known):
    """Every import statement of ``module`` (file ``path``), relative ones resolved; ``from pkg import mod``
    counts as an import of pkg.mod when that is a module in ``known``."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    origin = ".".join(base + ([child.module] if child.module else []))
                else:
                    origin = child.module
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in child.names]
            else:
                visit(child, inner)
                continue
            for target in dict.fromkeys(targets):
                found.append(Import(module, target, child.lineno, local, lines[child.lineno - 1].strip()))
    visit(ast.parse(source), False)
    return found


def all_imports():
    known = modules()
    return [imp for name, path in sorted(known.items()) for imp in imports_of(name, path, known)]


def within(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def report():
    known = modules()
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(ROOT))) for p in known.values()),
                   reverse=True)
    print("largest modules:", ", ".join(f"{path} {n}" for n, path in sizes[:5]))
    local = [i for i in all_imports() if i.local]
    ours = [i for i in local if within(i.target, ["pibake"])]
    print(f"function-local imports: {len(local)} ({len(ours)} of pibake.*)")
    by_module = {}
    for imp in local:
        by_module[imp.module] = by_module.get(imp.module, 0) + 1
    for module, n in sorted(by_module.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {n:3d}  {module}")


if __name__ == "__main__":
    sys.exit(report())
