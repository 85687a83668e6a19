"""Draw a walk (the answer of ancestors()/descendants()) as a terminal tree, Mermaid or Graphviz DOT.

    flashops lineage graph quickstart-chat --up --depth 10                 # tree
    flashops lineage graph quickstart-chat --up --format mermaid > g.mmd
    flashops lineage graph quickstart-chat --up --format dot | dot -Tsvg > g.svg
"""
from __future__ import annotations

import json

FORMATS = ("tree", "mermaid", "dot")


def describe(node: dict) -> str:
    """One line for a node: its type, what a person recognises it by, and its id."""
    t = node["type"]
    if t == "run":
        extra = f" {node.get('stage')} {node.get('status')}"
    elif t == "checkpoint":
        extra = f" step {node['step']}" if node.get("step") is not None else " (external)"
    elif t == "model":
        extra = f" {node.get('quantization')}" if node.get("quantization") not in (None, "none") else ""
    elif t == "deployment":
        extra = f" {node.get('traffic_percent')}%" + (" ended" if node.get("ended_at") else "")
    elif t == "evaluation":
        lines = evaluation_lines(node.get("result") or {})
        extra = f": {lines[0]}" + (f" (+{len(lines) - 1} more)" if len(lines) > 1 else "") if lines else ""
    else:
        extra = ""
    return f"{t} {node['label']}{extra} [lineage:{node['id']}]"


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def evaluation_lines(result: dict) -> list[str]:
    """One line per suite and mode of an evaluation result (`flashops lineage show`, the tree)."""
    lines = []
    for suite in result.get("suites") or []:
        for m in suite.get("modes") or []:
            acc = m.get("acceptance_length") or {}
            accept = " ".join(f"k{k}={_num(v, '.2f')}" for k, v in sorted(acc.items()) if v is not None)
            lines.append(f"{suite.get('name')} {m.get('mode')}: accuracy {_num(m.get('accuracy'), '.3f')}, "
                         f"{_num(m.get('mean_tokens'), '.1f')} tokens, {_num(m.get('accuracy_per_1k_tokens'), '.2f')}"
                         f"/1k tokens" + (f", acceptance {accept}" if accept else "")
                         + (f" ({m['tasks']} tasks)" if m.get("tasks") is not None else ""))
    return lines


def _children(walk: dict) -> dict[int, list[tuple[str, int]]]:
    up = walk["direction"] == "up"
    out: dict[int, list[tuple[str, int]]] = {}
    for e in walk["edges"]:
        parent, child = (e["dst"], e["src"]) if up else (e["src"], e["dst"])
        out.setdefault(parent, []).append((e["type"], child))
    for v in out.values():
        v.sort(key=lambda tc: tc[1])
    return out


def tree(walk: dict) -> str:
    nodes = {walk["root"]["id"]: walk["root"], **{n["id"]: n for n in walk["nodes"]}}
    children = _children(walk)
    arrow = "<-" if walk["direction"] == "up" else "->"
    lines = [describe(walk["root"])]
    shown = {walk["root"]["id"]}

    def visit(parent: int, prefix: str) -> None:
        kids = children.get(parent, [])
        for i, (edge, child) in enumerate(kids):
            last = i == len(kids) - 1
            again = child in shown  # a DAG: draw each node once, point back to it afterwards
            lines.append(f"{prefix}{'└── ' if last else '├── '}{arrow} {edge}: {describe(nodes[child])}"
                         + (" (shown above)" if again else ""))
            if not again:
                shown.add(child)
                visit(child, prefix + ("    " if last else "│   "))

    visit(walk["root"]["id"], "")
    if walk.get("truncated"):
        lines.append("... more (raise --limit)")
    return "\n".join(lines)


def mermaid(walk: dict) -> str:
    nodes = {walk["root"]["id"]: walk["root"], **{n["id"]: n for n in walk["nodes"]}}
    lines = ["flowchart LR"]
    for i, n in sorted(nodes.items()):
        label = describe(n).replace('"', "'")
        lines.append(f'    n{i}["{label}"]')
    for e in walk["edges"]:
        lines.append(f"    n{e['src']} -->|{e['type']}| n{e['dst']}")
    return "\n".join(lines)


def dot(walk: dict) -> str:
    nodes = {walk["root"]["id"]: walk["root"], **{n["id"]: n for n in walk["nodes"]}}
    shapes = {"dataset": "cylinder", "run": "box", "checkpoint": "ellipse", "model": "component",
              "deployment": "doubleoctagon"}
    lines = ["digraph lineage {", "    rankdir=LR;"]
    for i, n in sorted(nodes.items()):
        lines.append(f"    n{i} [label={json.dumps(describe(n))}, shape={shapes.get(n['type'], 'box')}];")
    for e in walk["edges"]:
        lines.append(f"    n{e['src']} -> n{e['dst']} [label={json.dumps(e['type'])}];")
    lines.append("}")
    return "\n".join(lines)


def render(walk: dict, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    return {"tree": tree, "mermaid": mermaid, "dot": dot}[fmt](walk)
