"""The house rules that keep lib/ easy to see: imports flow one way (the graph of lib modules, function-level
imports included, has no cycle), the stage modules do not reach sideways into each other, and lib imports at
function level only what is heavy or optional."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lib_imports() -> dict[str, set[str]]:
    """lib module -> the lib modules it imports anywhere in it (packages resolved to their modules)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "lib").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lib"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                found.update(subs or [node.module])
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("lib."))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_lib_imports_have_no_cycle():
    graph = lib_imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_stages_do_not_import_each_other_sideways():
    graph = lib_imports()
    assert "lib.sft" not in graph["lib.export"]  # export reads what SFT wrote, through hf_io / base_model
    assert "lib.pretrain" not in graph["lib.sft"]  # shared training helpers live in lib.train
    for low in ("lib.config", "lib.errors", "lib.artifacts", "lib.chat", "lib.hub", "lib.records"):
        assert not {m for m in graph[low] if m.startswith(("lib.serving", "lib.studio", "lib.sft", "lib.pretrain"))}


def test_function_level_lib_imports_are_few_and_explained():
    """A lib import inside a function is either the web stack (gradio/FastAPI, only when serving) or documented."""
    inner = []
    for path in sorted((ROOT / "lib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lib") and node.col_offset:
                inner.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
    allowed = ("lib.serving.api", "lib.serving.ui", "lib.studio.ui", "lib.serving.chat_cli")
    assert [i for i in inner if not i.endswith(allowed)] == [], inner


def test_atomic_file_appears_whole_with_an_ordinary_mode_or_not_at_all(tmp_path):
    """lib.artifacts.atomic_file is the one way to write a file in place: used for JSON, safetensors, GGUF, plots
    and bundles."""
    import os

    import pytest

    from lib.artifacts import atomic_file, current_umask

    target = tmp_path / "sub" / "weights.safetensors"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".safetensors" and not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == [target.name]  # nothing left behind
