"""Stage 04_export: the instruction-tuned model of stage 04_sft as files other tools run.

    artifacts/04_export/<hash>/
        hf/                     HF directory: config.json (llama), model.safetensors, tokenizer files with the chat
                                template, generation_config.json (eos = <|im_end|>, <|endoftext|>)
        <name>-f16.gguf         llama.cpp / Ollama files (lib/export/gguf.py), one per `export.gguf` entry
        <name>-q8_0.gguf
        Modelfile               `ollama create <name> -f Modelfile`
        manifest.json           what was written and the checks below

The HF model sits in `hf/` rather than beside the GGUF files because transformers, asked to load a GGUF from a
directory that also holds tokenizer files, mixes the two. Every export is checked here: transformers' logits on the
HF directory against our model's, and transformers' greedy decoding of each GGUF against our model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from lib.artifacts import is_complete, read_json, require_stage, stage_output
from lib.atomic import atomic_write_json, atomic_write_text
from lib.chat import OLLAMA_TEMPLATE, end_of_turn_ids, prompt_ids
from lib.config import Config
from lib.data.tokenizer import load_tokenizer
from lib.errors import UserError
from lib.export.gguf import write_gguf
from lib.model.hf_io import load_hf, save_model_dir
from lib.names import check_name
from lib.stages import stage, stage_dir, tuned_stage
from lib.train.base_model import merge_adapter, reply_ids

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "model.safetensors", "model.safetensors.index.json")
CHECK_PROMPTS = ["Hi! How are you?", "What is your name?"]
CHECK_TOKENS = 16


# ---------------------------------------------------------------------------------------------------------
# The HF directory.


def copy_hf_dir(src: Path, dst: Path) -> None:
    """Copy the model files of an HF directory (not metrics, adapters or manifests)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in HF_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())):
            shutil.copy2(src / shard, dst / shard)


def finish_tokenizer_config(hf: Path) -> None:
    """The tokenizer's model_max_length becomes the model's real context (stage 02 could not know it)."""
    conf = read_json(hf / "config.json")
    tok_cfg = read_json(hf / "tokenizer_config.json")
    ctx = conf.get("max_position_embeddings")
    if ctx:
        tok_cfg["model_max_length"] = ctx
        atomic_write_json(hf / "tokenizer_config.json", tok_cfg)


def build_hf_dir(sft_dir: Path, hf: Path) -> None:
    """The HF directory of the export: copied from 04_sft, or the base model with the LoRA adapter merged in
    when SFT saved the adapter alone (sft.lora.merge: false)."""
    has_weights = (sft_dir / "model.safetensors").is_file() or (sft_dir / "model.safetensors.index.json").is_file()
    if has_weights:
        copy_hf_dir(sft_dir, hf)
    elif (sft_dir / "adapter" / "adapter_config.json").is_file():
        base = Path(read_json(sft_dir / "manifest.json")["base_model"])
        if not (base / "config.json").is_file():
            raise UserError(f"{sft_dir}: the SFT output is a LoRA adapter of {base}, which no longer exists; rerun "
                            "stage 04_sft or set sft.lora.merge: true")
        save_model_dir(merge_adapter(base, sft_dir / "adapter").float(), hf, load_tokenizer(sft_dir))
    else:
        raise UserError(f"{sft_dir}: neither model weights nor a LoRA adapter; rerun stage 04_sft")
    finish_tokenizer_config(hf)


# ---------------------------------------------------------------------------------------------------------
# Checks: what transformers reads back equals what we trained.


def check_hf_dir(hf: Path, system_prompt: Optional[str]) -> dict:
    """Load the directory with transformers (no remote code) and compare its logits with our model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf), trust_remote_code=False)
    theirs = AutoModelForCausalLM.from_pretrained(str(hf), trust_remote_code=False, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(tok, CHECK_PROMPTS[0], system_prompt)])
    result = {"transformers_class": type(theirs).__name__}
    conf = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    if conf.get("model_type") == "llama":
        ours = load_hf(hf)
        with torch.no_grad():
            a = theirs(ids).logits
            b, _ = ours(ids)
        result["max_abs_logit_diff"] = float((a - b).abs().max())
    return result


def greedy_reference(hf: Path, system_prompt: Optional[str]) -> dict[str, list[int]]:
    """Our model's greedy tokens for the check prompts (the reference every GGUF must reproduce)."""
    tok = load_tokenizer(hf)
    model = load_hf(hf)
    return {p: reply_ids(model, prompt_ids(tok, p, system_prompt), CHECK_TOKENS, [])[0] for p in CHECK_PROMPTS}


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from a transformers model, never stopping early (a plain loop: no generation config
    decides anything behind our back)."""
    x = torch.tensor([ids])
    for _ in range(n):
        nxt = model(x).logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        x = torch.cat([x, nxt], dim=1)
    return x[0, len(ids):].tolist()


def check_gguf(path: Path, reference: dict[str, list[int]], system_prompt: Optional[str]) -> dict:
    """transformers reads the GGUF (model and tokenizer, dequantized); its greedy tokens against the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    matches = []
    for p, ref in reference.items():
        ids = prompt_ids(tok, p, system_prompt)
        matches.append(hf_greedy(model, ids, CHECK_TOKENS) == ref)
    return {"greedy_match": all(matches), "prompts_matching": sum(matches), "prompts": len(matches),
            "tokens": CHECK_TOKENS}


# ---------------------------------------------------------------------------------------------------------
# Ollama.

def modelfile(gguf_name: str, stops: list[str], context: int, system_prompt: Optional[str]) -> str:
    lines = ["# Ollama: ollama create <name> -f Modelfile && ollama run <name>", f"FROM ./{gguf_name}",
             f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append(f"PARAMETER num_ctx {context}")  # Ollama's default context may exceed what the model was trained on
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The stage.


def run_export(cfg: Config, force: bool = False) -> Path:
    final = stage_dir(cfg, "04_export")
    if is_complete(final) and not force:
        print(f"04_export: {final} is already complete; reusing it")
        return final
    name = check_name(cfg.export.name, "export.name")  # it becomes the GGUF file names and the Ollama name
    tuned = tuned_stage(cfg)  # phase 3's model, or phase 2's where phase 3 is off
    sft_dir = require_stage(cfg, tuned, f"Run: python {stage(tuned).script} (or snakemake {stage(tuned).target}).")
    system_prompt = cfg.sft.system_prompt
    with stage_output(cfg, "04_export") as (out, extra):
        hf = out / "hf"
        build_hf_dir(sft_dir, hf)
        conf = read_json(hf / "config.json")
        if cfg.export.gguf and conf.get("model_type") != "llama":
            raise UserError(f"export.gguf: the model is a {conf.get('model_type')!r}, and the GGUF export supports "
                            f"the llama architecture only; set export.gguf: [] to export the HF directory alone")
        extra["hf"] = {"dir": "hf", **check_hf_dir(hf, system_prompt)}
        print(f"04_export: HF directory written; transformers loads it as {extra['hf']['transformers_class']}"
              + (f", max |logit diff| vs ours {extra['hf']['max_abs_logit_diff']:.2e}"
                 if "max_abs_logit_diff" in extra['hf'] else ""))
        reference = greedy_reference(hf, system_prompt) if cfg.export.gguf else {}
        ggufs = []
        for qtype in dict.fromkeys(cfg.export.gguf):  # each type once, in the order given
            path = out / f"{name}-{qtype}.gguf"
            info = write_gguf(hf, path, qtype, name)
            info["check"] = check_gguf(path, reference, system_prompt)
            c = info["check"]
            print(f"04_export: {path.name} ({info['bytes'] / 1e6:.1f} MB); transformers' greedy output matches ours on "
                  f"{c['prompts_matching']}/{c['prompts']} prompts ({c['tokens']} tokens each)")
            if not c["greedy_match"]:
                print(f"04_export: warning: {path.name} decodes differently from the PyTorch model "
                      f"({'expected now and then for q8_0 on an undertrained model' if qtype == 'q8_0' else 'check the export'})")
            ggufs.append(info)
        extra["gguf"] = ggufs
        if cfg.export.modelfile and ggufs:
            tok = load_tokenizer(hf)
            chosen = next((g for g in ggufs if g["type"] == "q8_0"), ggufs[0])  # the smaller file runs faster
            stops = [tok.convert_ids_to_tokens(i) for i in end_of_turn_ids(tok)]
            atomic_write_text(out / "Modelfile", modelfile(chosen["file"], stops, conf.get("max_position_embeddings",
                                                                                            2048), system_prompt))
            extra["modelfile"] = {"file": "Modelfile", "from": chosen["file"], "stop": stops}
        extra["source"] = str(sft_dir)
    print(f"exported: {final}")
    return final
