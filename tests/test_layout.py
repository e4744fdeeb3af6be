"""The house rules that keep lib/ easy to see: imports flow one way (the graph of lib modules, function-level
imports included, has no cycle), the stage modules do not reach sideways into each other, and lib imports at
function level only what is heavy or optional."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from lib import ROOT


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
    assert "lib.train.sft" not in graph["lib.export.exporter"]  # export reads what SFT wrote, through hf_io / base_model
    assert "lib.train.pretrain" not in graph["lib.train.sft"]  # shared training helpers live in lib.train.loop
    for low in ("lib.config", "lib.errors", "lib.artifacts", "lib.chat", "lib.hub", "lib.data.records"):
        assert not {m for m in graph[low] if m.startswith(("lib.serving", "lib.studio", "lib.train.sft", "lib.train.pretrain"))}


@pytest.mark.slow  # a fresh interpreter importing the web stack: 4 s
def test_serving_is_below_the_app_and_imports_no_training_stack():
    """lib.app puts the API, the page and the studio together; serving imports neither it nor the studio nor the
    installer (which stands above serving: its post-test runs the server; both read installs through lib.models_dir),
    and what an embedding or speech install's start.sh imports to serve (the app, the API, both pages) loads with
    accelerate and peft unimportable and brings in nothing of lib/train or lib/studio: such an install's environment
    has neither."""
    graph = lib_imports()
    for m in (m for m in graph if m.startswith("lib.serving")):
        assert not {n for n in graph[m] if n.startswith(("lib.studio", "lib.app", "lib.install"))}, (m, graph[m])
    assert not {n for n in graph["lib.studio.ui"] if n == "lib.app"}
    code = """import sys
class Unimportable:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("accelerate", "peft"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Unimportable())
import lib.app, lib.serving.api, lib.serving.task_api, lib.serving.task_ui, lib.serving.ui, lib.serving.chat_cli
print(" ".join(sorted(m for m in sys.modules if m.startswith(("lib.train", "lib.studio", "accelerate", "peft")))))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == []


def test_function_level_lib_imports_are_few_and_explained():
    """A lib import inside a function is either the web stack (gradio/FastAPI, only when serving) or documented."""
    inner = []
    for path in sorted((ROOT / "lib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lib") and node.col_offset:
                inner.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
    allowed = ("lib.serving.api", "lib.serving.ui", "lib.studio.ui", "lib.serving.chat_cli", "lib.serving.task_api",
               "lib.serving.task_ui", "lib.serving.ollama", "lib.serving.router",
               "lib.train.base_model",  # serving merges an adapter with peft, which only chat installs carry
               # 06_install.py's list, info, remove and config answer without the installer and the training stack
               "lib.install.installer", "lib.install.finetune")
    assert [i for i in inner if not i.endswith(allowed)] == [], inner


def test_atomic_file_appears_whole_with_an_ordinary_mode_or_not_at_all(tmp_path):
    """lib.atomic.atomic_file is the one way to write a file in place: used for JSON, safetensors, GGUF, plots
    and bundles."""
    import os

    import pytest

    from lib.atomic import atomic_file, current_umask

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


def test_ruff_finds_nothing():
    """The lint config in pyproject.toml holds for the whole tree (CI runs it here, as part of the suite)."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    res = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_atomic_dir_publishes_whole_and_keeps_the_old_folder_until_the_new_one_is_in(tmp_path):
    """lib.atomic.atomic_dir is the one folder publish (stage outputs, checkpoints, installs, environments)."""
    import os

    import pytest

    from lib.atomic import atomic_dir, current_umask

    final = tmp_path / "install"
    with atomic_dir(final) as tmp:
        assert not final.exists()
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one" and final.stat().st_mode & 0o777 == 0o777 & ~current_umask()
    with pytest.raises(RuntimeError):
        with atomic_dir(final, keep_old=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("builder died")
    assert (final / "a.txt").read_text() == "one" and os.listdir(tmp_path) == ["install"]  # old kept, temp gone
    with atomic_dir(final, keep_old=True) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(os.listdir(final)) == ["b.txt"] and os.listdir(tmp_path) == ["install"]  # replaced, old removed


def test_every_test_file_has_an_area_and_the_readme_states_the_budgets():
    """tests/budget.py gives each test file one area with its time budget; the README's development section shows
    the same areas and budgets, which add up to no more than the full suite's."""
    import re

    from budget import AREAS, FULL_SUITE_S

    files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    homes = {f: [a for a, (_, fs) in AREAS.items() if f in fs] for f in files}
    assert {f: h for f, h in homes.items() if len(h) != 1} == {}, "each test file needs exactly one area"
    assert not [f for _, fs in AREAS.values() for f in fs if f not in files], "an area names a file that is gone"
    assert sum(b for b, _ in AREAS.values()) <= FULL_SUITE_S

    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("## Development", 1)[1]
    rows = {m.group(1).strip(): int(m.group(2)) for m in re.finditer(r"^\| ([^|]+?) \| (\d+) s \|", readme, re.M)}
    assert rows == {a: b for a, (b, _) in AREAS.items()}
