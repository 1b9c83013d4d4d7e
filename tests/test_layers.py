"""The package's layers import one way: each module imports only from its own layer or the ones
below it (function-local imports included), so the pipeline reads bottom-up and no module
needs a deferred import to break a cycle."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
#: bottom to top: the pipeline model -> capture -> channel spaces -> rules -> prune groups ->
#: rewrite -> plan -> entry points -> training -> the outside world -> the command line
LAYERS = ["base", "capture", "spaces", "rules", "analysis", "rewrite", "plan", "api", "train", "interop", "package",
          "cli"]
RULES = {"channel_analysis", "edit"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["hfp_fx", "passes"]:
        name = parts[2] if len(parts) > 2 else ""
        return "base" if name in ("registry", "") else "rules" if name in RULES or name.startswith("rules_") \
            else "rewrite"
    if module in ("hfp_fx.functional", "hfp_fx.progress"):
        return "base"
    if module in ("hfp_fx.interop.cli", "hfp_fx.__main__"):
        return "cli"
    if module == "hfp_fx":
        return "package"
    return {"spaces": "spaces", "api": "api"}.get(parts[1], parts[1])


def modules():
    found = {}
    for path in sorted((ROOT / "hfp_fx").rglob("*.py")) + sorted((ROOT / "passes").glob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("hfp_fx",) + rel) if rel[0] == "passes" else ".".join(rel)
        found[name.removesuffix(".__init__")] = path
    return found


def _walk(tree):
    """Every node, except inside ``if TYPE_CHECKING:`` (imports for annotations only)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        yield child
        yield from _walk(child)


def import_graph() -> nx.DiGraph:
    mods = modules()
    graph = nx.DiGraph()
    for name, path in mods.items():
        graph.add_node(name)
        for node in _walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hfp_fx"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph.add_edges_from((name, t) for t in targets if t in mods and t != name)
    return graph


def test_every_module_has_a_layer():
    assert {layer_of(m) for m in modules()} <= set(LAYERS)


def test_imports_go_one_way():
    graph = import_graph()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = sorted(f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, b in graph.edges
                    if rank[layer_of(b)] > rank[layer_of(a)])
    assert not upward, upward
    assert nx.is_directed_acyclic_graph(graph), next(nx.simple_cycles(graph))
