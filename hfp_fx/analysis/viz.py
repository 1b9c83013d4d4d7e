"""Pictures and tables of a dependency graph, and per-group kept widths of a pruned model.

matplotlib is optional (``pip install matplotlib``); the graph uses Graphviz's ``dot`` when it is
on the PATH, else networkx + matplotlib.

    >>> import torch, torchvision, hfp_fx
    >>> dg = hfp_fx.dependency_graph(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> "prunable" in dg.summary()
    True
"""
from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Union

from hfp_fx.passes.channel_analysis import iter_maps

__all__ = ["render_graph", "plot_widths", "summary_table", "to_networkx", "to_dot"]

log = logging.getLogger(__name__)
PathLike = Union[str, Path]


# -- the dependency graph as text, networkx and DOT -------------------------------------------
def summary_table(dg, max_members: int = 3, only_prunable: bool = False) -> str:
    """``dg.summary()``: one row per group (id, channels, member modules, prunable or why not)."""
    from tabulate import tabulate

    rows = []
    for g in dg.groups:
        if only_prunable and not g.prunable:
            continue
        mods = g.modules
        shown = ", ".join(mods[:max_members]) + (f" (+{len(mods) - max_members})" if len(mods) > max_members else "")
        status = "yes" if g.prunable else f"no: {_short(g.reason)}"
        rows.append([g.id, g.channels, shown, status])
    table = tabulate(rows, headers=["group", "channels", "members", "prunable"], tablefmt="github")
    total = sum(g.channels for g in dg.groups)
    pr = sum(g.channels for g in dg.prunable_groups)
    units = dg.depth_units
    depth = ""
    if units:
        rows = [[u.id, u.name, u.params, u.macs, "yes" if u.removable else f"no: {_short(u.reason)}"] for u in units]
        table += "\n\n" + tabulate(rows, headers=["depth unit", "branch", "params", "MACs", "removable"],
                                    tablefmt="github")
        depth = f"; {len(units)} depth units, {sum(u.removable for u in units)} removable"
    text = (f"{table}\n\n{len(dg.groups)} groups, {len(dg.prunable_groups)} prunable; "
            f"{pr}/{total} channels prunable ({100 * pr / max(total, 1):.1f}%){depth}")
    return text


def to_networkx(dg):
    """``dg.to_networkx()``: FX nodes (data flow) and group nodes linked to the modules they touch."""
    import networkx as nx

    g = nx.DiGraph()
    for node in dg.gm.graph.nodes:
        gids = set()
        for m in iter_maps(dg.channel_map(node.name)):
            gids.update(dg.groups_of(m.ids))
        g.add_node(node.name, kind="op", op=node.op, target=str(node.target), groups=sorted(gids))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name, kind="data")
    module_nodes = {n.target: n.name for n in dg.gm.graph.nodes if n.op == "call_module"}
    for grp in dg.groups:
        g.add_node(grp.id, kind="group", channels=grp.channels, prunable=grp.prunable, reason=grp.reason or "")
        for mod in grp.modules:
            if mod in module_nodes:
                g.add_edge(grp.id, module_nodes[mod], kind="member")
    return g


def to_dot(dg) -> str:
    """``dg.to_dot()``: Graphviz DOT text, ops as boxes, prunable groups in colour, fixed groups grey."""
    g = to_networkx(dg)
    palette = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5"]
    lines = ["digraph hfp {", "  rankdir=TB; node [fontname=Helvetica fontsize=10];"]
    for n, d in g.nodes(data=True):
        if d["kind"] == "group":
            color = palette[int(n[1:]) % len(palette)] if d["prunable"] else "#dddddd"
            label = f"{n}\\n{d['channels']} ch" + ("" if d["prunable"] else "\\nfixed")
            lines.append(f'  "{n}" [shape=ellipse style=filled fillcolor="{color}" label="{label}"];')
        else:
            label = f"{n}\\n{d['target']}" if d["op"] != "placeholder" else n
            lines.append(f'  "{n}" [shape=box label="{_esc(label)}"];')
    for u, v, d in g.edges(data=True):
        style = "dashed" if d["kind"] == "member" else "solid"
        lines.append(f'  "{u}" -> "{v}" [style={style}];')
    lines.append("}")
    return "\n".join(lines)


def _short(text: Optional[str], n: int = 70) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 3] + "..."


def _esc(s: str) -> str:
    return s.replace('"', "'")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc
    return plt


def render_graph(dg, path: PathLike) -> Path:
    """Draw a DependencyGraph to ``path`` (``.png``/``.svg``/``.pdf``; ``.dot`` writes DOT text)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    dot = dg.to_dot()
    if fmt == "dot":
        path.write_text(dot)
        return path
    exe = shutil.which("dot")
    if exe:
        subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=dot, text=True, check=True)
        return path
    log.info("graphviz 'dot' not found; drawing with networkx + matplotlib")
    plt = _pyplot()
    g = dg.to_networkx()
    # layers (call_module nodes) top to bottom, groups to the right, edges = membership
    layers = [n for n, d in g.nodes(data=True) if d["kind"] == "op" and d["op"] == "call_module"]
    row = {n: i for i, n in enumerate(layers)}
    groups = [n for n, d in g.nodes(data=True) if d["kind"] == "group"]
    fig, ax = plt.subplots(figsize=(9, max(4, len(layers) * 0.16)))
    for i, n in enumerate(layers):
        ax.text(0, -i, g.nodes[n]["target"], fontsize=6, ha="right", va="center")
    for gid in groups:
        members = [v for _, v in g.out_edges(gid) if v in row]
        if not members:
            continue
        y = -sum(row[v] for v in members) / len(members)
        d = g.nodes[gid]
        color = "#2a9d8f" if d["prunable"] else "#aaaaaa"
        for v in members:
            ax.plot([0.05, 1.0], [-row[v], y], color=color, lw=0.4, alpha=0.6)
        ax.text(1.02, y, f"{gid} ({d['channels']})", fontsize=6, va="center", color=color)
    ax.set_xlim(-1.2, 1.4)
    ax.set_ylim(-len(layers), 1)
    ax.set_axis_off()
    ax.set_title("prune groups (green: prunable, grey: fixed) and the layers they touch", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_widths(small, path: PathLike, title: Optional[str] = None) -> Path:
    """Bar chart of dense vs kept channels per prune group of a pruned model (``meta['hfp']``)."""
    groups = small.meta["hfp"].groups
    plt = _pyplot()
    names = list(groups)
    dense = [groups[g].dense for g in names]
    kept = [groups[g].kept for g in names]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.18), 3.5))
    ax.bar(range(len(names)), dense, color="#dddddd", label="dense")
    ax.bar(range(len(names)), kept, color="#1f77b4", label="kept")
    ax.set_xlabel("prune group (in graph order)")
    ax.set_ylabel("channels")
    ax.set_title(title or "channels per prune group")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
