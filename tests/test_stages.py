"""The stage map (lib/stages.py) is the one declaration of the pipeline: every entry is runnable as declared, the
Snakefile's rules are exactly its entries, and its hash depends on contents, never on where things live."""

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lib import ROOT
from lib.config import load_config
from lib.stages import STAGE, STAGES, model_stages, stage_hash, stages_of, upstream_stages

ALTERNATIVES = ([], ["tokenizer.pretrained=gpt2"], ["sft.base_model=some/hub-model"], ["prefs.enabled=false"])


def test_every_stage_is_declared_once_and_runnable_as_declared():
    assert len({s.name for s in STAGES}) == len({s.rule for s in STAGES} | {s.target for s in STAGES}) / 2 == len(STAGES)
    for s in STAGES:
        assert (ROOT / s.script).is_file(), s.script
        assert callable(getattr(importlib.import_module(s.module), s.entry)), f"{s.module}.{s.entry}"
        assert s.kind in ("data", "training", "export", "check", "install", "report")
        script = (ROOT / s.script).read_text()
        assert s.entry in script, f"{s.script} does not call {s.entry}"  # the script calls the declared entry
    order = [s.name for s in STAGES]
    for overrides in ALTERNATIVES:  # each reads only stages before it, under every shape of the pipeline
        cfg = load_config(ROOT / "config/smoke.yaml", overrides)
        for s in STAGES:
            assert all(order.index(u) < order.index(s.name) for u in upstream_stages(cfg, s.name)), s.name
    assert model_stages() == ("04_export", "04_prefs", "04_sft", "03_pretrain")
    assert stages_of("training") == ("03_pretrain", "04_sft", "04_prefs")
    # phase 3 switched off: the config does not run it, and the export takes phase 2
    off = load_config(ROOT / "config/smoke.yaml", ["prefs.enabled=false"])
    assert stages_of("training", cfg=off) == ("03_pretrain", "04_sft")
    assert upstream_stages(off, "04_export") == ["04_sft"]
    assert upstream_stages(load_config(ROOT / "config/smoke.yaml"), "04_export") == ["04_prefs"]


def test_the_snakefile_has_exactly_the_stage_maps_rules(tmp_path):
    shutil.copy2(ROOT / "config/smoke.yaml", tmp_path / "config.yaml")
    res = subprocess.run([sys.executable, "-m", "snakemake", "--list-rules", "-s", str(ROOT / "Snakefile"),
                          "--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rules = {line.strip() for line in res.stdout.splitlines() if re.fullmatch(r"\s*\w+\s*", line)}
    assert rules == {"all"} | {s.rule for s in STAGES} | {s.target for s in STAGES}


def test_hashes_follow_contents_not_locations(tmp_path):
    """A files corpus and a local SFT file, reached from configs in two different places (one a moved copy of the
    project): the same contents give the same hashes; an edit to a file changes exactly the stages reading it."""
    def project(where: Path) -> Path:
        (where / "corpus").mkdir(parents=True)
        (where / "corpus" / "a.txt").write_text("Once upon a time.\n\nThe end of the story.\n", encoding="utf-8")
        (where / "chat.jsonl").write_text('{"prompt": "Hi", "completion": "Hello!"}\n', encoding="utf-8")
        text = (ROOT / "config/smoke.yaml").read_text()
        (where / "config.yaml").write_text(text + "\n".join([
            "", "data:", "  sources:", "    - type: files", "      path: corpus/a.txt",
            "sft:", "  data:", "    - type: files", "      path: chat.jsonl", ""]), encoding="utf-8")
        return where / "config.yaml"

    cache = [f"artifacts_dir={tmp_path / 'artifacts'}"]  # where the content fingerprints are cached
    a = load_config(project(tmp_path / "here"), cache)
    b = load_config(project(tmp_path / "elsewhere" / "moved"), cache)
    assert {s.name: stage_hash(a, s.name) for s in STAGES} == {s.name: stage_hash(b, s.name) for s in STAGES}
    (tmp_path / "elsewhere" / "moved" / "chat.jsonl").write_text('{"prompt": "Hi", "completion": "Hey."}\n')
    changed = {s.name for s in STAGES if stage_hash(a, s.name) != stage_hash(b, s.name)}
    assert changed == {"04_sft", "04_prefs", "04_export", "05_check", "06_install", "08_report"}
    (tmp_path / "elsewhere" / "moved" / "corpus" / "a.txt").write_text("Another story.\n", encoding="utf-8")
    assert stage_hash(a, "01_data") != stage_hash(b, "01_data")
    assert STAGE["01_data"].hashes(b)["data"]["sources"][0]["path"] == "<local>"  # no absolute path in the hash
