"""The import rules of docs/ARCHITECTURE.md, held against the code (lazy imports inside functions count)."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# layer of each part of maws_fast (docs/ARCHITECTURE.md, "Layers")
LAYER = {"errors": 1, "seeds": 1, "storage": 1, "config": 2, "models": 3, "data": 3, "parallel": 3, "eval": 4,
         "train": 5, "bench": 6, "cli": 7}
# parts of one layer that must not import each other, and the exceptions below a layer
APART = {"models", "data", "parallel"}
FORBIDDEN = {("eval", "parallel")}


def _modules() -> dict[str, Path]:
    out = {}
    for f in (REPO / "maws_fast").rglob("*.py"):
        parts = f.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, f: Path, mods: dict[str, Path]) -> set[str]:
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods and t != "maws_kernels" and not t.startswith("maws_kernels."):
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else module


def test_imports_run_down_the_layers_only():
    mods = _modules()
    bad = []
    for name, f in mods.items():
        if name == "maws_fast":
            continue
        src = _part(name)
        for t in _imports(name, f, mods):
            if t.startswith("maws_kernels"):
                continue  # layer 0: anyone may use the kernels
            dst = _part(t)
            if dst == src or t == "maws_fast":
                continue
            if LAYER[dst] > LAYER[src] or (LAYER[dst] == LAYER[src] and {src, dst} <= APART) \
                    or (src, dst) in FORBIDDEN:
                bad.append(f"{name} imports {t}")
    assert not bad, "imports against docs/ARCHITECTURE.md:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    mods = _modules()
    edges = {m: {t for t in _imports(m, f, mods) if t in mods} for m, f in mods.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(v, path):
        if state.get(v) == 1:
            cycles.append(path[path.index(v):] + [v])
            return
        if state.get(v) == 2:
            return
        state[v] = 1
        for w in sorted(edges[v]):
            visit(w, path + [v])
        state[v] = 2

    for v in sorted(mods):
        visit(v, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles[:3])


def test_kernels_never_import_the_trainer():
    for f in (REPO / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith(("maws_fast", "nvidia.dali", "torch.distributed")) for n in names), f


def test_reading_a_config_imports_no_torch():
    code = ("import sys; from maws_fast.config import load_config; load_config('configs/demo_fmnist.yaml', []); "
            "print(sorted(m for m in ('torch', 'maws_kernels', 'maws_fast.models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
