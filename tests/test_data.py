"""Stage 01 (lib/data/prepare.py, lib/data/sources.py, 01_prepare_data.py): every source type on files written here, the
embedded packages, each kind of bad input with its message, dedup, split stability, determinism, the script."""

import gzip
import json
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from lib.config import from_dict
from lib.data.prepare import (
    MinHasher,
    U64Set,
    build_corpus,
    clean_text,
    iter_documents,
    jaccard_estimate,
    lsh_params,
    read_stats,
    run_data,
)
from lib.errors import UserError

WORDS = ("apple river stone cloud garden light music paper window silver forest dream candle ocean mountain "
         "whisper lantern meadow thunder velvet harbor compass ember glacier orchard prairie quartz saddle "
         "tundra violet willow yonder zephyr anchor bramble canyon dune falcon grove hollow island jasmine").split()


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def docs(n: int, seed: int = 0, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [f"{i} " + sentence(rng, words) for i in range(n)]


def make_cfg(tmp_path, sources, **data):
    data = {"sources": sources, "val_fraction": 0.0, "min_chars": 1, **data}
    return from_dict({"seed": 3, "artifacts_dir": str(tmp_path / "artifacts"), "data": data}, base_dir=str(tmp_path))


def build(tmp_path, sources, **data):
    """Run the stage; return (texts of train+val, stats)."""
    cfg = make_cfg(tmp_path, sources, **data)
    out = run_data(cfg)
    return list(iter_documents(out, "train")) + list(iter_documents(out, "val")), read_stats(out)


def write(path, text: str | bytes, gz: bool = False):
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------------------------------------------------
# Cleaning.


def test_clean_text_rules():
    assert clean_text("  a\x00b\x07c \r\nd\x0ce\u2028f  ") == "abc\nd\ne\nf"
    assert clean_text("tab\tkept\nline") == "tab\tkept\nline"
    assert clean_text("many     spaces\u00a0\u00a0and nbsp") == "many spaces and nbsp"
    assert clean_text("a  \n\n\n \n\nb") == "a\n\nb"  # trailing spaces go, at most one blank line
    assert clean_text("lone \ud800surrogate") == "lone surrogate"
    assert clean_text("e\u0301") == "\u00e9"  # NFC composes
    assert clean_text("\ufb01", "NFKC") == "fi" and clean_text("\ufb01", "NFC") == "\ufb01"
    assert clean_text("e\u0301", "none") == "e\u0301"
    assert clean_text(" \n\t \x01 ") == ""


# ---------------------------------------------------------------------------------------------------------
# Sources.


def test_txt_line_and_paragraph_modes(tmp_path):
    write(tmp_path / "a.txt", "\ufefffirst line here\n\nsecond line here\nthird line here\n")
    texts, stats = build(tmp_path, [{"type": "files", "path": "a.txt", "txt_mode": "line"}])
    assert sorted(texts) == ["first line here", "second line here", "third line here"]
    texts, stats2 = build(tmp_path / "p", [{"type": "files", "path": str(tmp_path / "a.txt"), "txt_mode": "paragraph"}])
    assert sorted(texts) == ["first line here", "second line here\nthird line here"]
    # a local source is named by its file name and contents, not by where it lives or how the config reached it
    assert stats["sources"][0]["label"] == "files:a.txt" and re.fullmatch(r"[0-9a-f]{16}", stats["sources"][0]["sha256"])
    assert stats["sources"][0]["kept"] == 3
    assert {k: stats2["sources"][0][k] for k in ("label", "sha256")} == {k: stats["sources"][0][k]
                                                                           for k in ("label", "sha256")}


def test_jsonl_json_csv_parquet_and_gz(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "in"
    d.mkdir()
    write(d / "a.jsonl", jsonl([{"text": "jsonl doc one"}, {"text": "jsonl doc two", "x": 1}]) + "\n")
    write(d / "b.jsonl.gz", jsonl([{"text": "gzipped jsonl doc"}]), gz=True)
    write(d / "c.json", json.dumps([{"text": "json array doc"}, {"text": "second json doc"}], indent=2))
    write(d / "d.json", json.dumps({"k1": {"text": "json object doc"}, "k2": {"text": "json object doc 2"}}))
    write(d / "e.csv", 'id,text\n1,"csv doc, with comma"\n2,"csv ""quoted""\nmultiline doc"\n')
    write(d / "f.csv.gz", "text\ngzipped csv doc\n", gz=True)
    write(d / "g.txt.gz", "gzipped text doc\n", gz=True)
    pq.write_table(pa.table({"text": ["parquet doc one", "parquet doc two"], "n": [1, 2]}), d / "h.parquet",
                   row_group_size=1)
    pq.write_table(pa.table({"text": ["gzipped parquet doc"]}), tmp_path / "i.parquet")
    write(d / "i.parquet.gz", (tmp_path / "i.parquet").read_bytes(), gz=True)
    texts, stats = build(tmp_path, [{"type": "files", "path": "in"}])  # a directory: every supported file
    assert sorted(texts) == sorted([
        "jsonl doc one", "jsonl doc two", "gzipped jsonl doc", "json array doc", "second json doc",
        "json object doc", "json object doc 2", "csv doc, with comma", 'csv "quoted"\nmultiline doc',
        "gzipped csv doc", "gzipped text doc", "parquet doc one", "parquet doc two", "gzipped parquet doc"])
    assert stats["removed"]["skipped_bad_records"] == 0
    # a glob, a custom text field, and several sources mixed in one config
    write(d / "j.jsonl", jsonl([{"content": "custom field doc"}]))
    texts, stats = build(tmp_path / "mix", [{"type": "files", "path": str(d / "*.jsonl"), "text_field": "content",
                                             "max_docs": 1}, {"type": "files", "path": str(d / "g.txt.gz")}],
                         on_bad_record="skip")
    assert texts == ["custom field doc", "gzipped text doc"]
    assert [s["kept"] for s in stats["sources"]] == [1, 1]
    assert stats["sources"][0]["skipped_bad_records"] == 2  # a.jsonl has no "content"; bad records are no documents


def test_large_json_array_streams_across_chunks(tmp_path):
    # records straddle the 1 MiB read chunks, including a number at a chunk end
    recs = [{"n": i, "text": f"record {i} " + "x" * (i % 700)} for i in range(4000)]
    write(tmp_path / "big.json", json.dumps(recs))
    texts, _ = build(tmp_path, [{"type": "files", "path": "big.json"}], dedup=False, near_dedup={"enabled": False})
    assert texts == [r["text"].strip() for r in recs]


def test_embedded_sources(tmp_path):
    texts, stats = build(tmp_path, [{"type": "bible", "max_docs": 5}, {"type": "fortunes", "max_docs": 5},
                                    {"type": "chitchat", "max_docs": 3}])
    assert texts[0] == "In the beginning God created the heaven and the earth."
    assert [s["read"] for s in stats["sources"]] == [5, 5, 3]
    assert [s["label"] for s in stats["sources"]] == ["bible", "fortunes", "chitchat"]
    chat = texts[-3:]
    assert chat[0].startswith("Hello How are you doing today?\nwhats up MD im doing good how are you doing?\n")
    assert chat[1].startswith("hi anyone here\nhey whats up yeah how are you\n")
    assert chat[2] == "hi there are you there?"  # a conversation of one turn
    assert not any(t.strip() == "%" or "\n%\n" in t for t in texts[5:10])  # fortune separators are gone


def test_hf_local_dataset_dir_and_offline(tmp_path, monkeypatch):
    ds = tmp_path / "localds"
    ds.mkdir()
    write(ds / "train.jsonl", jsonl([{"text": "hub reader local record one"}, {"text": "hub reader record two"}]))
    texts, _ = build(tmp_path, [{"type": "hf", "name": "localds"}])
    assert sorted(texts) == ["hub reader local record one", "hub reader record two"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"data.sources\[0\]: the hub dataset 'someone/corpus' cannot be streamed: "
                                        "HF_HUB_OFFLINE is set"):
        build(tmp_path / "x", [{"type": "hf", "name": "someone/corpus"}])
    # no network: an endpoint nobody listens on fails in well under the timeout, not after minutes of retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.time()
    with pytest.raises(UserError, match=r"127.0.0.1:9 is not reachable"):
        build(tmp_path / "y", [{"type": "hf", "name": "someone/corpus"}])
    assert time.time() - t0 < 10


# ---------------------------------------------------------------------------------------------------------
# Bad input: a UserError naming file:line, or a counted skip.


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"good line\nbad \xff byte\n", r"bad\.txt:2: not valid UTF-8 \(byte 0xff at column 5\)"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: not valid UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n\n{"text": "cut off',
     r"bad\.jsonl:3: invalid JSON: Unterminated string.*the line looks truncated"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON: Expecting value \(column 10\)"),
    ("bad.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n',
     r"bad\.jsonl:2: missing text field 'text' \(fields present: body"),
    ("bad.jsonl", b'{"text": 5}\n', r"bad\.jsonl:1: the text field 'text' holds int; expected a string"),
    ("bad.json", b'[\n {"text": "ok"},\n {"body": "x"}\n]', r"bad\.json:3: missing text field 'text'"),
    ("bad.csv", b'id,text\n1,"fine"\n2,"broken "quote" here"\n', r"bad\.csv:3: CSV error \(',' expected after '\"'\)"),
    ("bad.csv", b'id,text\n1,"never closed\n', r"bad\.csv:2: CSV error \(unexpected end of data\)"),
    ("bad.csv", b'id,text\n1\n', r"bad\.csv:2: the row has 1 fields, no 'text' column"),
    ("empty.txt", b"", r"empty\.txt: empty file"),
    ("blank.jsonl", b"\n  \n", r"blank\.jsonl: empty file"),
    ("bin.txt", b"\x7fELF\x02\x01\x00\x00text", r"bin\.txt: binary file \(NUL bytes"),
    ("u16.txt", "hello".encode("utf-16"), r"u16\.txt: UTF-16 text; expected UTF-8"),
])
def test_bad_records_error_or_skip(tmp_path, name, content, message):
    write(tmp_path / name, content)
    good = write(tmp_path / "good.jsonl", jsonl([{"text": "a good document"}]))
    sources = [{"type": "files", "path": name}, {"type": "files", "path": good.name}]
    with pytest.raises(UserError, match=message) as e:
        build(tmp_path, sources)
    assert "data.on_bad_record: skip" in str(e.value)
    _, stats = build(tmp_path, sources, on_bad_record="skip")
    assert stats["removed"]["skipped_bad_records"] >= 1
    assert stats["sources"][0]["skipped_bad_records"] == stats["removed"]["skipped_bad_records"]


@pytest.mark.parametrize("name, content, message", [
    ("broken.json", b'[\n {"text": "a"},\n {"text": "b"\n]', r"broken\.json:4: invalid JSON \(Expecting ',' delimiter\)"),
    ("broken.json", b'[{"text": "a"}, {"text": "b"}',
     r"broken\.json:1: invalid JSON: expected ',' or '\]', got end of file"),
    ("scalar.json", b'"just a string"', r"scalar\.json:1: invalid JSON: expected '\[' .* or '\{'"),
    ("nocol.csv", b"id,body\n1,x\n", r"nocol\.csv:1: no column 'text' in the CSV header \(columns: id, body\)"),
    ("bad.json.gz", b"not gzip at all", r"bad\.json\.gz: cannot read the file"),
    ("bad.parquet", b"PAR1 this is no parquet", r"bad\.parquet: not a readable parquet file"),
    ("notes.md", b"# hello", r"unsupported file type: .*notes\.md"),
])
def test_file_level_errors_even_with_skip(tmp_path, name, content, message):
    """Errors that no skipping can get past: a broken JSON structure, a missing column, a corrupt file."""
    write(tmp_path / name, content)
    with pytest.raises(UserError, match=message):
        build(tmp_path, [{"type": "files", "path": name}], on_bad_record="skip")


def test_missing_paths_and_empty_corpus(tmp_path):
    with pytest.raises(UserError, match=r"data.sources\[1\].path: no such file or directory: .*nope\.txt"):
        build(tmp_path, [{"type": "bible", "max_docs": 2}, {"type": "files", "path": "nope.txt"}])
    with pytest.raises(UserError, match=r"data.sources\[0\].path: the glob 'corpus/\*\.jsonl' matches no file"):
        build(tmp_path, [{"type": "files", "path": "corpus/*.jsonl"}])
    write(tmp_path / "short.txt", "hi\nyo\nok\n")
    with pytest.raises(UserError, match=r"the corpus is empty after filtering \(files:short.txt: read 3, kept 0; "
                                        r"removed: empty 0, too_short 3"):
        build(tmp_path, [{"type": "files", "path": "short.txt", "txt_mode": "line"}], min_chars=5)
    write(tmp_path / "few.txt", "\n".join(docs(3)))
    with pytest.raises(UserError, match=r"data.val_fraction: 0.01 of 3 documents put none into the validation split"):
        build(tmp_path, [{"type": "files", "path": "few.txt", "txt_mode": "line"}], val_fraction=0.01)
    assert not list((tmp_path / "artifacts" / "01_data").glob("*/manifest.json"))  # nothing half-done left


def test_length_filters_and_oversized_paragraph(tmp_path):
    write(tmp_path / "a.txt", "tiny\n\n" + "a fine paragraph of text\n\n" + ("word " * 300 + "\n") * 50)
    texts, stats = build(tmp_path, [{"type": "files", "path": "a.txt"}], min_chars=8, max_chars=200)
    assert texts == ["a fine paragraph of text"]
    assert stats["removed"]["too_short"] == 1 and stats["removed"]["too_long"] == 1
    assert stats["length_histogram_chars"] == {"16-31": 1}


# ---------------------------------------------------------------------------------------------------------
# Dedup.


def test_u64set_matches_python_set():
    rng = np.random.default_rng(0)
    s, ref = U64Set(capacity=8), set()
    for _ in range(20):  # several growths, repeats within and across batches
        keys = rng.integers(0, 3000, size=500, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        seen = s.add(keys)
        expect = []
        for k in keys.tolist():
            expect.append(k in ref or (k == 0 and 1 in ref))
            ref.add(k or 1)
        assert seen.tolist() == expect
    assert s.size == len(ref)


def test_minhash_estimates_jaccard():
    """Our vectorised MinHash estimates the Jaccard similarity of word 3-gram sets as well as datasketch does."""
    import datasketch

    ours, theirs = [], []
    for seed in range(6):
        rng = random.Random(seed)
        base = [rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(400)]
        other = list(base)
        for i in rng.sample(range(400), 40):
            other[i] = "changed" + str(i)
        A, B = set(zip(base, base[1:], base[2:])), set(zip(other, other[1:], other[2:]))
        true = len(A & B) / len(A | B)
        sig = MinHasher(num_perm=256, shingle_words=3, seed=seed).signatures(
            [" ".join(base), " ".join(other).upper(), "completely different words here"])
        ours.append(abs(jaccard_estimate(sig[0], sig[1]) - true))  # upper case: lower-cased before shingling
        assert jaccard_estimate(sig[0], sig[2]) < 0.05
        ma, mb = datasketch.MinHash(num_perm=256, seed=seed), datasketch.MinHash(num_perm=256, seed=seed)
        ma.update_batch([" ".join(t).encode() for t in A])
        mb.update_batch([" ".join(t).encode() for t in B])
        theirs.append(abs(ma.jaccard(mb) - true))
    # a document too long for one block (18,000 shingles, done in pieces): its shingles are those of two halves
    # overlapping by 4 words, so its signature is the elementwise minimum of theirs
    words = [f"w{i}" for i in range(18_000)]
    m = MinHasher(num_perm=64, shingle_words=5, seed=1)
    sig = m.signatures(["another doc", " ".join(words), " ".join(words[:9004]), " ".join(words[9000:]), "one more"])
    assert (sig[1] == np.minimum(sig[2], sig[3])).all()
    assert not (sig[1] == sig[2]).all() and not (sig[1] == sig[3]).all()
    # the standard error at J ~0.57 with 256 permutations is ~0.03
    assert np.mean(ours) < 0.05 and np.mean(ours) < 2 * np.mean(theirs) + 0.01, (ours, theirs)
    assert lsh_params(0.85, 64) == (4, 15)  # datasketch's MinHashLSH picks the same bands for these settings
    assert lsh_params(0.5, 128) == (25, 5)


def test_exact_and_near_dedup(tmp_path):
    rng = random.Random(5)
    uniques = [sentence(rng, 1000) for _ in range(20)]
    near = []
    for t in uniques[:5]:  # one word changed in 1000: Jaccard of 5-word shingles ~0.99
        w = t.split()
        w[100] = "CHANGED"
        near.append(" ".join(w))
    lines = uniques + [uniques[3], "  " + uniques[4] + "  "] + near  # exact repeats (after cleaning) + near dups
    write(tmp_path / "d.txt", "\n".join(lines) + "\n")
    src = [{"type": "files", "path": str(tmp_path / "d.txt"), "txt_mode": "line"}]
    texts, stats = build(tmp_path, src)
    assert texts == uniques
    assert stats["removed"]["exact_dup"] == 2 and stats["removed"]["near_dup"] == 5
    texts, stats = build(tmp_path / "nodedup", src, dedup=False, near_dedup={"enabled": False})
    assert len(texts) == len(lines) and stats["dedup_index"]["exact_keys"] == 0


def test_repeat_passes_are_not_deduplicated_against_each_other(tmp_path):
    write(tmp_path / "small.txt", "\n".join(docs(10)) + "\n")
    write(tmp_path / "big.txt", "\n".join(docs(10, seed=9)) + "\n" + docs(10)[0] + "\n")
    texts, stats = build(tmp_path, [{"type": "files", "path": "small.txt", "txt_mode": "line", "repeat": 3},
                                    {"type": "files", "path": "big.txt", "txt_mode": "line"}])
    assert texts == docs(10) * 3 + docs(10, seed=9)
    assert stats["sources"][0]["read"] == 30 and stats["sources"][1]["exact_dup"] == 1


# ---------------------------------------------------------------------------------------------------------
# Split, shards, determinism.


def test_split_is_stable_when_documents_are_added(tmp_path):
    write(tmp_path / "a.txt", "\n".join(docs(400)) + "\n")
    cfg = make_cfg(tmp_path, [{"type": "files", "path": "a.txt", "txt_mode": "line"}], val_fraction=0.2)
    out = run_data(cfg)
    val = set(iter_documents(out, "val"))
    assert 40 < len(val) < 120
    write(tmp_path / "a.txt", "\n".join(docs(1000, seed=1) + docs(400)) + "\n")  # more documents, some before
    out2 = run_data(cfg)
    assert out2 != out  # the hash covers the file's contents: new contents, a new stage directory
    assert set(iter_documents(out2, "val")) >= val
    assert not val & set(iter_documents(out2, "train"))


def test_shards_roll_over_and_determinism(tmp_path):
    rng = random.Random(2)
    write(tmp_path / "a.txt", "\n".join(f"{i} {sentence(rng, 40)} ünïcödé \"quoted\"" for i in range(5000)) + "\n")
    sources = [{"type": "files", "path": str(tmp_path / "a.txt"), "txt_mode": "line"}]
    cfg = make_cfg(tmp_path, sources, shard_mb=1, val_fraction=0.1)
    a = run_data(cfg)
    # the same config again, in this process only (no worker processes) and with two workers: the same bytes
    for workers in (0, 2):
        b = tmp_path / f"workers{workers}"
        b.mkdir()
        build_corpus(cfg, b, workers=workers)
        names = sorted(p.name for p in a.glob("*.jsonl"))
        assert names == sorted(p.name for p in b.glob("*.jsonl"))
        for n in names + ["stats.json"]:
            assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert names == ["train-00000.jsonl", "train-00001.jsonl", "val-00000.jsonl"]
    assert (a / "train-00000.jsonl").stat().st_size <= 1 << 20
    stats = read_stats(a)
    assert stats["splits"]["train"]["shards"] == names[:2]
    texts = list(iter_documents(a, "train"))
    assert len(texts) == stats["splits"]["train"]["documents"] and texts[0].endswith('ünïcödé "quoted"')
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["documents"] == {"train": len(texts), "val": stats["splits"]["val"]["documents"]}
    assert manifest["removed"]["exact_dup"] == 0


def test_iter_documents_reads_plain_json_lines_and_reports_damage(tmp_path):
    (tmp_path / "train-00000.jsonl").write_text('{"text": "canonical \\"line\\" \\u00e9"}\n{"text":"compact"}\n'
                                                 '{"other": 1, "text": "reordered"}\n', encoding="utf-8")
    assert list(iter_documents(tmp_path, "train")) == ['canonical "line" \u00e9', "compact", "reordered"]
    (tmp_path / "val-00000.jsonl").write_text('{"text": "fine"}\n{"text": "cut', encoding="utf-8")
    with pytest.raises(UserError, match=r"val-00000\.jsonl:2: not a corpus line .* rebuild it"):
        list(iter_documents(tmp_path, "val"))
    with pytest.raises(UserError, match=r"no val shards"):
        list(iter_documents(tmp_path / "nothing", "val"))


def test_parquet_null_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first parquet row", None, "third parquet row"]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r"n\.parquet: row 2: the text field 'text' is null"):
        build(tmp_path, [{"type": "files", "path": "n.parquet"}])
    texts, stats = build(tmp_path, [{"type": "files", "path": "n.parquet"}], on_bad_record="skip")
    assert texts == ["first parquet row", "third parquet row"] and stats["removed"]["skipped_bad_records"] == 1
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(UserError, match=r"m\.parquet: no column 'text' \(columns: body\)"):
        build(tmp_path / "m", [{"type": "files", "path": str(tmp_path / "m.parquet")}], on_bad_record="skip")


# ---------------------------------------------------------------------------------------------------------
# The script.


def test_script_runs_and_reports(tmp_path, repo_root):
    write(tmp_path / "c.txt", "\n".join(docs(200)) + "\n")
    (tmp_path / "cfg.yaml").write_text(f"artifacts_dir: {tmp_path / 'art'}\ndata:\n  sources:\n"
                                       "    - {type: files, path: c.txt, txt_mode: line}\n  val_fraction: 0.1\n")
    cmd = [sys.executable, str(repo_root / "01_prepare_data.py"), "--config", str(tmp_path / "cfg.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "01_data: 200 documents" in res.stdout and str(tmp_path / "art" / "01_data") in res.stdout
    # one mode for every file of an artifact: manifest.json and stats.json as readable as the shards beside them
    stage = next((tmp_path / "art" / "01_data").iterdir())
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in stage.iterdir()}
    assert {"manifest.json", "stats.json"} <= set(modes) and set(modes.values()) == {0o666 & ~umask}, modes
    assert stage.stat().st_mode & 0o777 == 0o777 & ~umask
    res = subprocess.run(cmd + ["--quiet-config"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and "already complete" in res.stdout

    script = [sys.executable, str(repo_root / "01_prepare_data.py"), "--config", str(tmp_path / "bad.yaml")]
    (tmp_path / "bad.yaml").write_text("data:\n  sources:\n    - {type: files, path: missing/*.txt}\n  min_char: 3\n")
    res = subprocess.run(script, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert "data.min_char: unknown key (did you mean min_chars?)" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "bad.yaml").write_text("data:\n  sources:\n    - {type: files, path: missing/*.txt}\n")
    res = subprocess.run(script, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "the glob 'missing/*.txt' matches no file" in res.stderr
    assert "Traceback" not in res.stderr
