#!/usr/bin/env python3
"""mxgate's module graph: each top-level module of src/ with its lines, the modules it
uses (`crate::name` anywhere in its files), and the circles among them.

usage: tools/imports.py [SRC]   (default: src/ next to this script's folder)
"""
import pathlib
import re
import sys

src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent / "src")
modules = {}
for path in sorted(src.iterdir()):
    name = path.stem
    if name in ("lib", "main"):
        continue
    files = sorted(path.rglob("*.rs")) if path.is_dir() else [path]
    # a module's tests.rs is its test module in a file of its own
    modules[name] = [f for f in files if f.name != "tests.rs"]

uses, lines = {}, {}
for name, files in modules.items():
    # each file without its comments and its test module (at its end): what a module
    # needs to be built, not to be documented or tested
    text = "\n".join(
        re.sub(r"#\[cfg\(test\)\]\s*mod tests \{.*", "", re.sub(r"//.*", "", f.read_text()), flags=re.S)
        for f in files
    )
    lines[name] = sum(len(f.read_text().splitlines()) for f in files)
    used = set(re.findall(r"crate::(\w+)", text))
    # use crate::{a::x, b}: each name at the head of a part
    for group in re.findall(r"crate::\{([^}]*)\}", text):
        used.update(part.strip().split("::")[0] for part in group.split(","))
    uses[name] = sorted(m for m in used if m in modules and m != name)

for name in modules:
    print(f"{name:<10} {lines[name]:>6}  -> {', '.join(uses[name]) or '-'}")

# circles: strongly connected components of more than one module (Tarjan)
index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in uses[v]:
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        component = []
        while True:
            w = stack.pop()
            on.discard(w)
            component.append(w)
            if w == v:
                break
        if len(component) > 1:
            found.append(sorted(component))


sys.setrecursionlimit(10000)
for v in modules:
    if v not in index:
        visit(v)
print("circles:", "; ".join(" <-> ".join(c) for c in found) if found else "none")
