"""Model check: what a model is, what it needs, how much memory and disk it takes, and whether it fits this
machine, without downloading or reading its weights.

A model reference is a local HF directory, a .gguf file, a Hugging Face hub id (owner/name: only metadata is
fetched: the file list with sizes, small config files, safetensors headers) or the pipeline's own export dir.
Its type is detected from its files' structure by a chain of detectors (never from its name). Estimates come
from exact parameter counts (safetensors / GGUF headers) where present, else from config formulas; every
formula is written into the report. Used by 05_check.py and by lib/install.py (which refuses what does not fit).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lib.artifacts import atomic_write_json, atomic_write_text, require_stage, stage_output
from lib.config import CheckConfig, Config, stage_dir
from lib.errors import UserError
from lib.hub import endpoint, hub_call, hub_token, offline_reason
from lib.hardware import probe_hardware

REPORT_VERSION = 1
MiB, GiB = 2**20, 2**30

# Bytes per parameter of the weights in each dtype. int8/int4 are llama.cpp's Q8_0 / Q4_0 block formats:
# 32 weights share one fp16 scale, so 8.5 and 4.5 bits per weight (bitsandbytes is within a few % of this).
DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 34 / 32, "int4": 18 / 32}
TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                     "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5}
SAFETENSORS_DTYPE_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                          "I8": "int8", "U8": "uint8", "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2"}

# Calibrated by bench/bench_check_memory.py (transformers 5.23, torch 2.13 CPU): besides weights, KV cache and
# activations, loading a tokenizer + model with transformers and running generate() grows a process that has
# already imported torch and transformers by 143-146 MB, whatever the model size (0.9M-135M parameters): lazily
# imported model/tokenizer/generation code, the chat-template engine, allocator pools and thread pools.
RUNTIME_OVERHEAD_BYTES = 145 * MiB
# What `python -c "import torch, transformers"` occupies before any model (measured: 249 MB). Counted in the
# RAM a CPU run needs, not in the per-model estimate that the benchmark checks.
FRAMEWORK_BYTES = 250 * MiB
# A CUDA context + cuBLAS workspaces take device memory before any tensor (typical for CUDA 12; not
# calibrated here: the development machines have no GPU).
GPU_CONTEXT_BYTES = 500 * MiB
# `import peft` (LoRA) grows a process that already imported torch + transformers by 136 MB (measured).
PEFT_IMPORT_BYTES = 136 * MiB
# Disk for an environment: a venv made with --system-site-packages reuses what is installed (a few MB);
# a fresh one needs torch (CPU wheel ~0.8 GB, CUDA ~5 GB with its libraries) + transformers & friends.
ENV_DISK_BYTES = {"shared (--system-site-packages)": 20 * MiB, "fresh venv, CPU torch": int(1.6 * GiB),
                  "fresh venv, CUDA torch": int(6.5 * GiB)}
# "close to limit" above this share of the available memory
CLOSE_TO_LIMIT = 0.85
# The context length assumed when a config does not say
DEFAULT_CONTEXT = 2048

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------------------------------------------------
# Sources: one interface over a local directory, a GGUF file and a hub repository.


@dataclass
class Source:
    """Where a model lives and how to read its small files. Weights are never read, only headers."""

    ref: str
    kind: str  # "local" | "gguf" | "hub"
    files: dict[str, int]  # relative path -> size in bytes
    root: Path | None = None  # local: the model directory
    gguf_file: Path | None = None  # gguf: the file
    repo_id: str | None = None
    revision: str | None = None  # hub: the commit sha the metadata came from
    # export dirs: GGUF files and an Ollama Modelfile beside the HF model (absolute paths)
    extras: list[str] = field(default_factory=list)
    _api: object | None = None
    _timeout: float = 10.0
    _json: dict = field(default_factory=dict)

    def read_json(self, rel: str) -> dict | None:
        """A small JSON file of the model (None if absent); invalid JSON is a UserError naming the file."""
        if rel not in self.files:
            return None
        if rel not in self._json:
            text = self._read_text(rel)
            try:
                self._json[rel] = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{self.describe(rel)}:{e.lineno}: invalid JSON ({e.msg})") from None
        return self._json[rel]

    def _read_text(self, rel: str) -> str:
        if self.kind == "hub":
            path = hub_call(lambda: self._api.hf_hub_download(self.repo_id, rel, revision=self.revision,
                                                                etag_timeout=self._timeout), self.repo_id)
            return Path(path).read_text(encoding="utf-8")
        return (self.root / rel).read_text(encoding="utf-8")

    def describe(self, rel: str = "") -> str:
        if self.kind == "hub":
            return f"{self.repo_id}@{(self.revision or 'main')[:12]}/{rel}".rstrip("/")
        base = self.gguf_file if self.kind == "gguf" else self.root
        return str(base / rel) if rel else str(base)

    def safetensors_headers(self) -> dict[str, dict[str, tuple[str, list[int]]]]:
        """{file: {tensor: (dtype, shape)}} for every .safetensors file, from headers only."""
        names = sorted(f for f in self.files if f.endswith(".safetensors"))
        if not names:
            return {}
        if self.kind == "hub":
            return _hub_safetensors(self, names)
        return {n: read_safetensors_header(self.root / n) for n in names}

    def fingerprint(self) -> str:
        """Changes when the model changes (used by install to decide whether a saved check is stale)."""
        if self.kind == "hub":
            return f"hub:{self.repo_id}@{self.revision}"
        h = hashlib.sha256()
        base = self.gguf_file if self.kind == "gguf" else self.root
        for rel in sorted(self.files):
            st = (base if self.kind == "gguf" else base / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return f"{self.kind}:{h.hexdigest()[:16]}"


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """The tensor table of a .safetensors file: an 8-byte little-endian length, then that much JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * MiB:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items()}


def _list_local(root: Path) -> dict[str, int]:
    """Files under a model dir (hidden files/dirs such as .git and .cache are skipped), at most 3 levels deep."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__" and depth < 3)
        for name in filenames:
            if not name.startswith("."):
                p = Path(dirpath) / name
                out[str(p.relative_to(root))] = p.stat().st_size
    return out


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


MODEL_MARKERS = ("config.json", "model_index.json", "params.json", "model_config.yaml", "adapter_config.json")


def find_model_root(path: Path) -> tuple[Path | None, Path | None, list[str]]:
    """(HF model dir, GGUF file, extras) inside a directory.

    A model directory has a config file at its top. An export directory may instead hold the HF model in
    one sub-directory, with GGUF files and an Ollama Modelfile beside it: those become `extras`.
    """
    extras = sorted(str(p) for p in path.iterdir() if p.is_file() and (p.suffix == ".gguf" or p.name == "Modelfile"))
    if any((path / m).is_file() for m in MODEL_MARKERS):
        return path, None, extras
    subdirs = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")
               and any((d / m).is_file() for m in ("config.json", "model_index.json"))]
    if len(subdirs) > 1:  # several candidates: prefer the conventional names
        subdirs = [d for d in subdirs if d.name in ("hf", "model", "hf_model")] or subdirs
    if len(subdirs) == 1:
        return subdirs[0], None, extras
    ggufs = [Path(e) for e in extras if e.endswith(".gguf")]
    if len(ggufs) >= 1:  # a folder holding only GGUF files: the largest is the model (others are often mmproj)
        return None, max(ggufs, key=lambda p: p.stat().st_size), extras
    return None, None, extras


def open_source(ref: str, cfg: CheckConfig | None = None) -> Source:
    """Resolve a model reference to a Source, or a UserError saying what was expected."""
    cfg = cfg or CheckConfig()
    path = Path(str(ref)).expanduser()
    if path.is_file():
        if not _is_gguf(path):
            raise UserError(f"{path}: a model is a directory (Hugging Face format) or a .gguf file; this file is "
                            "neither (no 'GGUF' magic bytes)")
        path = path.resolve()
        return Source(ref=str(ref), kind="gguf", files={path.name: path.stat().st_size}, gguf_file=path)
    if path.is_dir():
        path = path.resolve()
        root, gguf_file, extras = find_model_root(path)
        if root is not None:
            return Source(ref=str(ref), kind="local", files=_list_local(root), root=root, extras=extras)
        if gguf_file is not None:
            return Source(ref=str(ref), kind="gguf", files={gguf_file.name: gguf_file.stat().st_size},
                          gguf_file=gguf_file, extras=[e for e in extras if e != str(gguf_file)])
        present = sorted(p.name for p in path.iterdir())[:12]
        raise UserError(f"{path}: no config files: expected config.json (transformers), model_index.json "
                        f"(diffusers) or a .gguf file; the directory holds: {', '.join(present) or 'nothing'}")
    if HUB_ID.match(str(ref)) and not str(ref).startswith((".", "/", "~")):
        return open_hub(str(ref), cfg)
    raise UserError(f"{ref}: model not found: no such file or directory, and not a Hugging Face hub id "
                    "(expected a local model directory, a .gguf file or owner/name)")


# ---------------------------------------------------------------------------------------------------------
# The hub: metadata only. The real huggingface_hub client; HF_ENDPOINT (read at call time) may point it at a
# mirror, which is also how the tests serve recorded responses from a local server.


def open_hub(repo_id: str, cfg: CheckConfig) -> Source:
    if offline_reason():
        raise UserError(f"{repo_id}: the hub is in offline mode (HF_HUB_OFFLINE=1): unset it to check a hub id, "
                        "or check a local copy of the model instead")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), token=hub_token(cfg))
    info = hub_call(lambda: api.model_info(repo_id, revision=cfg.revision, files_metadata=True,
                                            timeout=cfg.hub_timeout_s), repo_id)
    files = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    return Source(ref=repo_id, kind="hub", files=files, repo_id=repo_id, revision=info.sha or cfg.revision,
                  _api=api, _timeout=cfg.hub_timeout_s)


def _hub_safetensors(src: Source, names: list[str]) -> dict:
    api = src._api
    out = {}
    root_names = [n for n in names if "/" not in n]
    if root_names and ("model.safetensors" in src.files or "model.safetensors.index.json" in src.files):
        meta = hub_call(lambda: api.get_safetensors_metadata(src.repo_id, revision=src.revision,
                                                              timeout=src._timeout), src.repo_id)
        for fname, fm in meta.files_metadata.items():
            out[fname] = {k: (t.dtype, list(t.shape)) for k, t in fm.tensors.items()}
    for n in names:  # other files (diffusers components in sub-folders, unusual names): header by header
        if n not in out:
            fm = hub_call(lambda: api.parse_safetensors_file_metadata(src.repo_id, n, revision=src.revision,
                                                                       timeout=src._timeout), src.repo_id)
            out[n] = {k: (t.dtype, list(t.shape)) for k, t in fm.tensors.items()}
    return out


# ---------------------------------------------------------------------------------------------------------
# GGUF metadata.


def read_gguf(path: Path) -> dict:
    """Architecture, hyper-parameters, chat template and tensor table of a GGUF file (tensor data untouched)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None

    def val(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 - an unusual field type: treat as absent
            return default

    arch = val("general.architecture", "unknown")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    tensors = [(t.name, [int(x) for x in t.shape], gguf.GGMLQuantizationType(t.tensor_type).name,
                int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]
    try:
        file_type = gguf.LlamaFileType(val("general.file_type")).name.replace("MOSTLY_", "")
    except (ValueError, TypeError):
        file_type = None
    return {
        "architecture": arch, "name": val("general.name"), "file_type": file_type,
        "context_length": val(f"{arch}.context_length"), "hidden": val(f"{arch}.embedding_length"),
        "layers": val(f"{arch}.block_count"), "heads": val(f"{arch}.attention.head_count"),
        "kv_heads": val(f"{arch}.attention.head_count_kv"), "ffn": val(f"{arch}.feed_forward_length"),
        "vocab": val(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None),
        "experts": val(f"{arch}.expert_count"), "experts_used": val(f"{arch}.expert_used_count"),
        "ssm_inner": val(f"{arch}.ssm.inner_size"), "ssm_state": val(f"{arch}.ssm.state_size"),
        "ssm_conv": val(f"{arch}.ssm.conv_kernel"),
        "chat_template": val("tokenizer.chat_template"),
        "tensors": tensors,
    }


# ---------------------------------------------------------------------------------------------------------
# Type detection: a chain of detectors over the files' structure. The first that recognises the model wins.

SSM_TYPES = {"mamba", "mamba2", "falcon_mamba"}
HYBRID_SSM_TYPES = {"jamba", "zamba", "zamba2", "bamba", "nemotron_h", "granitemoehybrid", "falcon_h1"}
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet",
                 "albert", "camembert", "nomic_bert", "modernbert", "xlm", "ernie", "jina_bert", "new"}
# model_type special cases whose task the generic rules would get wrong
SPECIAL_TASKS = {"whisper": "automatic-speech-recognition", "clip": "image-text-embedding",
                 "siglip": "image-text-embedding", "wav2vec2": "automatic-speech-recognition",
                 "speecht5": "text-to-speech", "musicgen": "text-to-audio"}
ENCODER_TASKS = {"embedding", "text-classification", "token-classification", "image-text-embedding"}
GGUF_EMBEDDING_ARCHS = {"bert", "nomic-bert", "jina-bert-v2", "t5encoder"}


@dataclass
class Detection:
    task: str  # text-generation, embedding, seq2seq, multimodal, text-to-image, ...
    family: str  # model_type or GGUF architecture
    architecture: str | None  # class name
    detected_by: str  # which rule fired, for the report
    loader: str | None  # library that loads it: transformers / sentence-transformers / diffusers / None
    config: dict = field(default_factory=dict)  # the text model's config (the LLM part of a multimodal model)
    full_config: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)  # diffusers: name -> {library, class, config}
    gguf: dict | None = None
    problems: list[str] = field(default_factory=list)  # reasons it cannot be loaded as is


def _transformers_knows(model_type: str | None, archs: list[str]) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type and model_type in CONFIG_MAPPING_NAMES:
        return True
    import transformers

    return any(hasattr(transformers, a) for a in archs)


def detect_diffusers(src: Source) -> Detection | None:
    index = src.read_json("model_index.json")
    if index is None:
        return None
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and spec[0]):
            continue
        lib, cls = spec
        conf = None
        for cname in ("config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json"):
            conf = src.read_json(f"{name}/{cname}")
            if conf is not None:
                break
        components[name] = {"library": lib, "class": cls, "config": conf or {}}
    return Detection(task="text-to-image" if "unet" in components or "transformer" in components else "diffusion",
                     family=index.get("_class_name", "DiffusionPipeline"), architecture=index.get("_class_name"),
                     detected_by="model_index.json -> diffusers pipeline", loader="diffusers",
                     full_config=index, components=components)


def detect_config_json(src: Source) -> Detection | None:
    cfg = src.read_json("config.json")
    if not isinstance(cfg, dict):
        return None
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    arch = archs[0] if archs else None
    mt = cfg.get("model_type")
    if not arch and not mt:
        return None  # not a transformers config (e.g. CTranslate2's): let the other detectors try
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    st = any(f in src.files for f in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"))

    def make(task, rule, loader="transformers", conf=cfg):
        return Detection(task=task, family=mt or arch, architecture=arch, detected_by=f"config.json: {rule}",
                         loader=loader, config=conf, full_config=cfg)

    if mt in SPECIAL_TASKS:
        det = make(SPECIAL_TASKS[mt], f"model_type {mt!r}")
    elif "vision_config" in cfg and ("text_config" in cfg or (arch or "").endswith("ForConditionalGeneration")):
        det = make("multimodal", "vision_config + text_config", conf=text_cfg)
    elif st:
        det = make("embedding", "sentence-transformers modules", loader="sentence-transformers")
    elif cfg.get("is_encoder_decoder"):
        det = make("seq2seq", "is_encoder_decoder")
    elif arch and arch.endswith(("ForCausalLM", "LMHeadModel")):
        det = make("text-generation", f"{arch} (*ForCausalLM)")
    elif arch and arch.endswith("ForMaskedLM"):
        det = make("embedding", f"{arch} (*ForMaskedLM, encoder-only)")
    elif arch and arch.endswith("ForSequenceClassification"):
        det = make("text-classification", f"{arch} (*ForSequenceClassification)")
    elif arch and arch.endswith("ForTokenClassification"):
        det = make("token-classification", f"{arch} (*ForTokenClassification)")
    elif mt in ENCODER_TYPES or (arch and arch.endswith("Model") and "type_vocab_size" in cfg):
        det = make("embedding", "encoder-only backbone")
    elif mt in SSM_TYPES | HYBRID_SSM_TYPES:
        det = make("text-generation", f"model_type {mt!r} (state-space)")
    elif arch is None and mt:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return None
        det = make("text-generation", f"model_type {mt!r} has a causal-LM class")
    else:
        return None
    if "auto_map" in cfg:
        det.problems.append("the config asks for custom Python code from the repository (auto_map): loading "
                            "needs trust_remote_code, which is off by default for safety")
    elif det.loader and not _transformers_knows(mt, archs):
        import transformers

        raise UserError(f"{src.describe('config.json')}: Unsupported model architecture: model_type {mt!r}, "
                        f"architecture {arch!r} is not known to the installed transformers "
                        f"{transformers.__version__}. Upgrade transformers if the model is newer than it.")
    return det


def detect_gguf(src: Source) -> Detection | None:
    if src.kind != "gguf":
        return None
    g = read_gguf(src.gguf_file)
    arch = g["architecture"]
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if arch in GGUF_EMBEDDING_ARCHS:
        task = "embedding"
    elif arch in ("clip", "mllama-vision") or arch.endswith("-vision"):
        task = "vision-projector"
    else:
        task = "text-generation"
    det = Detection(task=task, family=arch, architecture=arch, detected_by=f"GGUF general.architecture={arch!r}",
                    loader="transformers" if arch in GGUF_CONFIG_MAPPING else None, gguf=g,
                    config={k: g[k] for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab",
                                              "context_length", "experts", "experts_used", "ssm_inner",
                                              "ssm_state", "ssm_conv")})
    if det.loader is None:
        det.problems.append(f"transformers cannot import GGUF architecture {arch!r} (it reads: "
                            f"{', '.join(k for k in GGUF_CONFIG_MAPPING if k not in ('general', 'tokenizer'))}); "
                            "run it with llama.cpp or Ollama instead")
    return det


def detect_alt_config(src: Source) -> Detection | None:
    """Configs under other names that still describe an architecture."""
    if "params.json" in src.files:
        p = src.read_json("params.json") or {}
        if "dim" in p and "n_layers" in p:
            det = Detection(task="text-generation", family="llama (reference params.json)", architecture=None,
                            detected_by="params.json with dim/n_layers (Meta/Mistral reference format)",
                            loader=None, config={"hidden": p["dim"], "layers": p["n_layers"],
                                                 "heads": p.get("n_heads"), "kv_heads": p.get("n_kv_heads"),
                                                 "vocab": p.get("vocab_size"), "context_length": p.get("max_seq_len")},
                            full_config=p)
            det.problems.append("reference (consolidated.*.pth) format: convert it to Hugging Face format first "
                                "(transformers' convert_llama_weights_to_hf / convert_mistral_weights_to_hf)")
            return det
    if "model_config.yaml" in src.files:
        import yaml

        y = yaml.safe_load(src._read_text("model_config.yaml")) or {}
        if isinstance(y, dict) and "n_layer" in y and "n_embd" in y:
            det = Detection(task="text-generation", family=f"litgpt ({y.get('name', '?')})", architecture=None,
                            detected_by="model_config.yaml with n_layer/n_embd (LitGPT)", loader=None,
                            config={"hidden": y["n_embd"], "layers": y["n_layer"], "heads": y.get("n_head"),
                                    "kv_heads": y.get("n_query_groups"), "ffn": y.get("intermediate_size"),
                                    "vocab": y.get("padded_vocab_size") or y.get("vocab_size"),
                                    "context_length": y.get("block_size")}, full_config=y)
            det.problems.append("LitGPT checkpoint: convert it with `litgpt convert_from_litgpt` first")
            return det
    if "adapter_config.json" in src.files:
        a = src.read_json("adapter_config.json") or {}
        det = Detection(task="adapter", family=f"{a.get('peft_type', 'PEFT')} adapter", architecture=None,
                        detected_by="adapter_config.json (PEFT adapter)", loader=None, full_config=a)
        det.problems.append(f"a PEFT adapter, not a full model: it needs its base model "
                            f"{a.get('base_model_name_or_path')!r}; merge it (04_sft does with lora.merge) first")
        return det
    return None


DETECTORS = [detect_diffusers, detect_config_json, detect_gguf, detect_alt_config]


def detect(src: Source) -> Detection:
    for detector in DETECTORS:
        det = detector(src)
        if det is not None:
            return det
    hint = ""
    if "model.bin" in src.files and ("vocabulary.txt" in src.files or "vocabulary.json" in src.files):
        hint = (" It looks like a CTranslate2 model (model.bin + vocabulary file, config.json without model_type): "
                "run it with ctranslate2 / faster-whisper, not with transformers.")
    elif any(f.endswith(".onnx") for f in src.files):
        hint = " It holds ONNX files: run it with onnxruntime / optimum."
    raise UserError(f"{src.describe()}: Unsupported model architecture: no detector recognised it (looked for "
                    f"model_index.json, config.json with model_type/architectures, GGUF metadata, params.json, "
                    f"model_config.yaml, adapter_config.json).{hint}")


# ---------------------------------------------------------------------------------------------------------
# Hyper-parameters in one vocabulary, whatever the config calls them.


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            return v
    return default


GATED_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
               "gemma3_text", "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm", "starcoder2", "deepseek_v2",
               "deepseek_v3", "smollm3", "internlm2", "exaone", "glm", "glm4", "helium", "jamba"}


def dims_of(det: Detection) -> dict:
    """hidden, layers, heads, kv_heads, head_dim, ffn, vocab, context, tied, gated MLP, experts, SSM sizes."""
    c = det.config or {}
    if det.gguf is not None or det.architecture is None:  # already normalised (GGUF, params.json, litgpt)
        hidden, layers = c.get("hidden"), c.get("layers")
        heads = c.get("heads") or (max(1, (hidden or 64) // 64))
        kv = c.get("kv_heads") or heads
        d = {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv,
             "head_dim": (hidden // heads) if hidden and heads else None,
             "ffn": c.get("ffn") or (4 * hidden if hidden else None),
             "vocab": c.get("vocab"), "context": c.get("context_length"),
             "tied": det.gguf is not None and not any(t[0] == "output.weight" for t in det.gguf["tensors"]),
             "gated": det.family not in ("gpt2", "bloom", "falcon", "starcoder", "bert", "phi2"),
             "experts": c.get("experts") or 1, "experts_used": c.get("experts_used") or 1,
             "attention": "ssm" if det.family in ("mamba", "mamba2") else "full",
             "ssm_inner": c.get("ssm_inner"), "ssm_state": c.get("ssm_state"), "ssm_conv": c.get("ssm_conv"),
             "bias": False, "positions": 0}
        return d
    mt = c.get("model_type") or det.family
    hidden = _first(c, "hidden_size", "n_embd", "d_model", "dim", "embed_dim")
    layers = _first(c, "num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
    heads = _first(c, "num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads")
    kv = _first(c, "num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
    if kv is None and c.get("multi_query"):
        kv = 1
    kv = kv or heads
    head_dim = _first(c, "head_dim", "d_kv") or (hidden // heads if hidden and heads else None)
    ffn = _first(c, "intermediate_size", "n_inner", "ffn_dim", "d_ff", "decoder_ffn_dim", "ffn_hidden_size")
    if ffn is None and hidden:
        ffn = 4 * hidden
    act = str(_first(c, "hidden_act", "hidden_activation", "activation_function", default=""))
    ssm = mt in SSM_TYPES
    d = {
        "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv, "head_dim": head_dim, "ffn": ffn,
        "vocab": c.get("vocab_size"),
        "context": _first(c, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                          "max_sequence_length", "max_target_positions"),
        "tied": bool(c.get("tie_word_embeddings", det.full_config.get("tie_word_embeddings", True))),
        "gated": mt in GATED_TYPES or act in ("silu", "swish", "swiglu"),
        "experts": _first(c, "num_local_experts", "num_experts", "n_routed_experts", default=1) or 1,
        "experts_used": _first(c, "num_experts_per_tok", "num_experts_per_token", default=1) or 1,
        "attention": "ssm" if ssm else "full",
        "ssm_inner": _first(c, "intermediate_size", "d_inner") if ssm else None,
        "ssm_state": _first(c, "state_size", "d_state", "ssm_state_size") if ssm else None,
        "ssm_conv": _first(c, "conv_kernel", "d_conv") if ssm else None,
        # GPT-2/BERT style: biases everywhere and learned absolute positions
        "bias": bool(c.get("attention_bias") or c.get("qkv_bias") or mt in ("gpt2", "bert", "roberta", "whisper")
                     or mt in ENCODER_TYPES),
        "positions": (_first(c, "n_positions", "max_position_embeddings") or 0)
        if (mt in ("gpt2", "gpt_neo", "opt", "whisper") or c.get("position_embedding_type") == "absolute") else 0,
        "type_vocab": c.get("type_vocab_size") or 0,
    }
    if ssm:
        if not d["ssm_inner"] and hidden:
            d["ssm_inner"] = int(c.get("expand", 2) * hidden)
        d["ssm_state"] = d["ssm_state"] or 16
        d["ssm_conv"] = d["ssm_conv"] or 4
        d["heads"] = d["kv_heads"] = d["head_dim"] = None
    if det.task == "seq2seq" or mt == "whisper":
        d["encoder_layers"] = _first(c, "encoder_layers", "num_layers", default=layers)
        d["layers"] = _first(c, "decoder_layers", "num_decoder_layers", default=layers)
    return d


def vision_params_from_config(vc: dict, text_hidden: int | None) -> int:
    """A ViT tower: L_v * (4*d_v^2 + 2*d_v*f_v) + patch embedding, plus a 2-layer projector d_v*d + d*d."""
    dv = _first(vc, "hidden_size", "embed_dim", "width")
    lv = _first(vc, "num_hidden_layers", "depth", "layers")
    if not (dv and lv):
        return 0
    fv = _first(vc, "intermediate_size", "mlp_dim", default=4 * dv)
    patch = _first(vc, "patch_size", default=14)
    tower = lv * (4 * dv * dv + 2 * dv * fv) + 3 * patch * patch * dv
    return int(tower + (dv * text_hidden + text_hidden * text_hidden if text_hidden else 0))


def params_from_config(d: dict) -> int | None:
    """Parameter count from hyper-parameters (used when no weight headers are available). Norm weights and
    biases are counted; exotic extras (rotary tables, pooler heads) are not, so expect a few % off."""
    h, L, V = d.get("hidden"), d.get("layers"), d.get("vocab")
    if not (h and L and V):
        return None
    if d["attention"] == "ssm":
        di, ds, dc = d["ssm_inner"], d["ssm_state"], d["ssm_conv"]
        dt_rank = math.ceil(h / 16)
        # in_proj (x and gate), depthwise conv, x_proj (dt, B, C), dt_proj, A_log, D, out_proj, norm
        layer = h * 2 * di + di * dc + di + di * (dt_rank + 2 * ds) + dt_rank * di + di + di * ds + di + di * h + h
        return V * h + L * layer + h + (0 if d["tied"] else V * h)
    nh, nkv, hd, f = d["heads"], d["kv_heads"], d["head_dim"], d["ffn"]
    b = 1 if d.get("bias") else 0
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + b * (nh * hd + 2 * nkv * hd + h)
    mlp = (3 if d["gated"] else 2) * h * f + b * (f + h)
    if d["experts"] > 1:
        mlp = d["experts"] * mlp + h * d["experts"]  # experts + router
    norms = 2 * h * (1 + b)  # two norms per layer (LayerNorm has a bias too)
    total = V * h + L * (attn + mlp + norms) + h + (0 if d["tied"] else V * h)
    total += d.get("positions", 0) * h + d.get("type_vocab", 0) * h
    if d.get("encoder_layers"):  # encoder stack; each decoder layer also has cross-attention
        total += d["encoder_layers"] * (attn + mlp + norms) + L * (attn + 2 * h)
    return int(total)


# ---------------------------------------------------------------------------------------------------------
# Requirements: libraries by type, special packages by architecture, dtype and quantization.

SPECIAL_PACKAGES = {
    "mamba-ssm": ("mamba_ssm", "hard: Linux + NVIDIA GPU + CUDA toolkit; compiles CUDA kernels from source (10-30 "
                  "min) unless a prebuilt wheel matches your torch/CUDA. Optional: transformers falls back to a slow "
                  "pure-PyTorch path (the only one on CPU)"),
    "causal-conv1d": ("causal_conv1d", "hard: NVIDIA GPU + CUDA toolkit, compiles from source; optional like "
                      "mamba-ssm"),
    "flash-attn": ("flash_attn", "hard: NVIDIA Ampere or newer GPU; compiles for a long time unless a prebuilt wheel "
                   "matches torch/CUDA. Optional: transformers uses PyTorch SDPA attention without it"),
    "bitsandbytes": ("bitsandbytes", "easy on Linux + NVIDIA GPU (pip wheel); CPU support is limited"),
    "gptqmodel": ("gptqmodel", "medium: needs a GPU and compiles kernels on install"),
    "optimum": ("optimum", "easy (pip wheel)"),
    "autoawq": ("awq", "medium: NVIDIA GPU only"),
    "compressed-tensors": ("compressed_tensors", "easy (pip wheel)"),
    "hqq": ("hqq", "easy (pip wheel)"),
    "ninja": ("ninja", "easy (pip wheel); with a CUDA toolkit it builds RWKV's fast kernel at first use"),
    "gguf": ("gguf", "easy (pip wheel, pure Python); transformers uses it to dequantize GGUF files"),
}
QUANT_PACKAGES = {"bitsandbytes": ["bitsandbytes"], "gptq": ["optimum", "gptqmodel"], "awq": ["autoawq"],
                  "compressed-tensors": ["compressed-tensors"], "hqq": ["hqq"]}


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirements(src: Source, det: Detection) -> dict:
    libs = [("torch", "tensors and the forward pass")]
    task_libs = {
        "text-generation": [("transformers", "loads the model and generates"), ("accelerate", "low-memory loading")],
        "embedding": [("transformers", "loads the encoder")],
        "seq2seq": [("transformers", "encoder-decoder model")],
        "multimodal": [("transformers", "vision-language model"), ("pillow", "image input")],
        "text-to-image": [("diffusers", "the pipeline"), ("transformers", "text encoders"),
                          ("accelerate", "low-memory loading")],
        "automatic-speech-recognition": [("transformers", "speech model"), ("soundfile", "audio input"),
                                         ("librosa", "audio resampling")],
        "image-text-embedding": [("transformers", "CLIP-style model"), ("pillow", "image input")],
    }
    libs += task_libs.get(det.task, [("transformers", det.task)] if det.loader == "transformers" else [])
    if det.loader == "sentence-transformers":
        libs.append(("sentence-transformers", "pooling/normalisation modules (modules.json)"))
    files = src.files
    if "tokenizer.model" in files and "tokenizer.json" not in files:
        libs.append(("sentencepiece", "tokenizer.model (SentencePiece) without tokenizer.json"))
    if any(f.endswith(".tiktoken") for f in files):
        libs.append(("tiktoken", "*.tiktoken vocabulary"))
    if any(f.endswith(".safetensors") for f in files):
        libs.append(("safetensors", "weights format"))
    special: list[tuple[str, str, bool]] = []  # (package, why, optional)
    mt = det.full_config.get("model_type") or det.family
    if mt in SSM_TYPES or mt in HYBRID_SSM_TYPES:
        special += [("mamba-ssm", f"{mt}: fast selective-scan kernels", True),
                    ("causal-conv1d", f"{mt}: fast causal convolution", True)]
    if mt == "rwkv":
        special.append(("ninja", "rwkv: optional fast CUDA kernel", True))
    attn_impl = det.full_config.get("_attn_implementation") or det.full_config.get("attn_implementation")
    if attn_impl == "flash_attention_2":
        special.append(("flash-attn", "config asks for flash_attention_2", True))
    quant = det.full_config.get("quantization_config") or (det.config or {}).get("quantization_config")
    qmethod = quant.get("quant_method") if isinstance(quant, dict) else None
    for pkg in QUANT_PACKAGES.get(qmethod or "", []):
        special.append((pkg, f"weights quantized with {qmethod}", False))
    if src.kind == "gguf":
        special.append(("gguf", "reading the GGUF file", False))
    out_libs = [{"name": n, "why": w, "installed": _installed(n)} for n, w in dict(libs).items()]
    out_special = [{"name": n, "why": w, "optional": opt, "installed": _installed(n),
                    "difficulty": SPECIAL_PACKAGES.get(n, (None, "see the package's documentation"))[1]}
                   for n, w, opt in special]
    warnings = []
    saved_with = det.full_config.get("transformers_version")
    have = _installed("transformers")
    if saved_with and have and det.loader == "transformers" and _version_tuple(saved_with) > _version_tuple(have):
        warnings.append(f"saved with transformers {saved_with}, newer than the installed {have}: "
                        "upgrade transformers if loading fails")
    return {"libraries": out_libs, "special": out_special, "quantization": quant if isinstance(quant, dict) else None,
            "remote_code": "auto_map" in det.full_config, "warnings": warnings}


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


# ---------------------------------------------------------------------------------------------------------
# Estimates. Every formula used is listed in FORMULAS and copied into the report.

FORMULAS = [
    "P = parameter count: exact sum of tensor sizes from safetensors/GGUF headers when present, else from the "
    "config: V*d (embeddings) [+ V*d untied head] + L*(attention d*(h+2*kv)*hd + h*hd*d, MLP 3*d*f gated or "
    "2*d*f, 2 norms*d) + d, times E experts for the MLP of MoE models; multimodal: + vision tower "
    "L_v*(4*d_v^2 + 2*d_v*f_v) + projector d_v*d + d*d",
    "weights(dtype) = P * bytes(dtype); bytes: fp32 4, fp16/bf16 2, int8 1.0625 (Q8_0: 8.5 bit), "
    "int4 0.5625 (Q4_0: 4.5 bit)",
    "kv_cache = 2 (K and V) * L * kv_heads * head_dim * S * B * bytes_kv; bytes_kv = 4 for fp32, else 2 "
    "(state-space models: L * B * d_inner * (d_state + d_conv) * 4, independent of S)",
    "activations (inference, prefill of S tokens) = B * S * (4*d + 2*kv*hd + 3*f) * bytes_act + B * V * 4 (logits "
    "of the last position, fp32); assumes fused SDPA attention (eager attention adds B*h*S*S*bytes_act)",
    "load_transient = stored weight bytes when a 32/16-bit dtype differs from the stored one (the file is "
    "mapped while converted copies are made), else 0; int8/int4 assume pre-quantized weights (GGUF, bitsandbytes)",
    "inference(dtype) = weights + kv_cache + activations + load_transient + runtime overhead (145 MB, calibrated "
    "by bench/bench_check_memory.py: tokenizer, lazily imported model/generation code, allocator and thread pools)",
    "CPU RAM needed = inference + 250 MB (python + torch + transformers imported); GPU memory needed = inference "
    "- runtime overhead + 500 MB (CUDA context, cuBLAS workspace)",
    "train_activations = L * Bt * St * (10*d + 4*f) * bytes_act + 3 * Bt * St * V * 4 (logits, log-softmax and their "
    "gradient in fp32); with gradient checkpointing the first term becomes L * Bt * St * d * bytes_act + one layer",
    "full fine-tuning = 16 * P (fp32 weights 4 + gradients 4 + AdamW m,v 8) + train_activations + runtime overhead",
    "LoRA = P * bytes(base dtype) + 16 * P_lora + train_activations + L * Bt * St * sum(out of adapted projections) "
    "* bytes_act (adapter outputs) + 136 MB (peft import) + runtime overhead; P_lora = L * r * sum over adapted "
    "projections of (in + out) (q,k,v,o,gate,up,down)",
    "disk = model files + installed copy (the GGUF import stores P * 4 bytes) + environment (shared venv 20 MB, "
    "fresh CPU venv 1.6 GB, fresh CUDA venv 6.5 GB)",
]


def stored_weights(src: Source, det: Detection, headers: dict) -> dict:
    """Exact parameter count and stored bytes, from headers; else None (filled from formulas later)."""
    if det.gguf is not None:
        t = det.gguf["tensors"]
        return {"params": sum(x[3] for x in t), "bytes": sum(x[4] for x in t), "source": "GGUF tensor table",
                "dtypes": sorted({x[2] for x in t}), "format": "gguf"}
    if headers:
        params, nbytes, dtypes = 0, 0, {}
        for tensors in headers.values():
            for dtype, shape in tensors.values():
                n = math.prod(shape) if shape else 1
                params += n
                nbytes += n * SAFETENSORS_BYTES.get(dtype, 4)
                dtypes[dtype] = dtypes.get(dtype, 0) + n
        main = max(dtypes, key=dtypes.get) if dtypes else None
        return {"params": params, "bytes": int(nbytes), "source": "safetensors headers",
                "dtypes": sorted(dtypes, key=dtypes.get, reverse=True), "main_dtype": main, "format": "safetensors"}
    weights = {f: s for f, s in src.files.items() if f.endswith(WEIGHT_SUFFIXES)}
    fmt = None
    if any(f.endswith(PICKLE_SUFFIXES) for f in weights):
        fmt = "pytorch-pickle"
    return {"params": None, "bytes": sum(weights.values()) or None, "source": None, "dtypes": [], "format": fmt}


def _act_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def kv_cache_bytes(d: dict, seq: int, batch: int, dtype: str) -> int:
    if d["attention"] == "ssm":
        if not (d.get("layers") and d.get("ssm_inner")):
            return 0
        return int(d["layers"] * batch * d["ssm_inner"] * ((d["ssm_state"] or 16) + (d["ssm_conv"] or 4)) * 4)
    if not (d.get("layers") and d.get("kv_heads") and d.get("head_dim")):
        return 0
    return int(2 * d["layers"] * d["kv_heads"] * d["head_dim"] * seq * batch * _act_bytes(dtype))


def inference_activation_bytes(d: dict, seq: int, batch: int, dtype: str) -> int:
    h, f, V = d.get("hidden") or 0, d.get("ffn") or 0, d.get("vocab") or 0
    kvd = (d.get("kv_heads") or 0) * (d.get("head_dim") or 0)
    if d["attention"] == "ssm":
        f = 2 * (d["ssm_inner"] or 0)
    return int(batch * seq * (4 * h + 2 * kvd + 3 * f) * _act_bytes(dtype) + batch * V * 4)


def estimate_inference(P: int, d: dict, dtype: str, seq: int, batch: int, stored_dtype: str | None) -> dict:
    """Memory of loading the model in `dtype` and generating up to `seq` tokens (see FORMULAS)."""
    weights = int(P * DTYPE_BYTES[dtype])
    kv = kv_cache_bytes(d, seq, batch, dtype) if d.get("kv_cache", True) else 0
    act = inference_activation_bytes(d, seq, batch, dtype)
    transient = 0
    # int8/int4 assume pre-quantized weights (a GGUF file, a bitsandbytes checkpoint): nothing is converted
    if stored_dtype and stored_dtype != dtype and dtype in TORCH_DTYPE:
        transient = int(P * DTYPE_BYTES.get(stored_dtype, 4))
    total = weights + kv + act + transient + RUNTIME_OVERHEAD_BYTES
    return {"weights": weights, "kv_cache": kv, "activations": act, "load_transient": transient,
            "runtime_overhead": RUNTIME_OVERHEAD_BYTES, "total": total}


def lora_params(d: dict, rank: int) -> int:
    h, f, L = d.get("hidden") or 0, d.get("ffn") or 0, d.get("layers") or 0
    if d["attention"] == "ssm":  # in_proj and out_proj
        return int(L * rank * ((h + 2 * d["ssm_inner"]) + (d["ssm_inner"] + h)))
    q = (d.get("heads") or 0) * (d.get("head_dim") or 0)
    kv = (d.get("kv_heads") or 0) * (d.get("head_dim") or 0)
    per_layer = (h + q) + 2 * (h + kv) + (q + h)  # q, k, v, o
    per_layer += (2 * (h + f) + (f + h)) if d["gated"] else 2 * (h + f)  # gate, up, down / fc1, fc2
    return int(L * rank * per_layer)


def lora_activation_bytes(d: dict, seq: int, batch: int, act_bytes: int) -> int:
    """The adapter branches' outputs, B*S*out per adapted projection, alive until they are added to the base output."""
    h, f, L = d.get("hidden") or 0, d.get("ffn") or 0, d.get("layers") or 0
    if d["attention"] == "ssm":
        return int(L * batch * seq * (2 * (d["ssm_inner"] or 0) + h) * act_bytes)
    q = (d.get("heads") or 0) * (d.get("head_dim") or 0)
    kv = (d.get("kv_heads") or 0) * (d.get("head_dim") or 0)
    outs = q + 2 * kv + h + ((2 * f + h) if d["gated"] else (f + h))
    return int(L * batch * seq * outs * act_bytes)


def train_activation_bytes(d: dict, seq: int, batch: int, act_bytes: int, checkpointing: bool = False) -> int:
    h, f, L, V = d.get("hidden") or 0, d.get("ffn") or 0, d.get("layers") or 0, d.get("vocab") or 0
    if d["attention"] == "ssm":
        f = 2 * (d["ssm_inner"] or 0)
    per_layer = batch * seq * (10 * h + 4 * f) * act_bytes
    layers = (L * batch * seq * h * act_bytes + per_layer) if checkpointing else L * per_layer
    return int(layers + 3 * batch * seq * V * 4)


def estimate_training(P: int, d: dict, cfg: CheckConfig, act_dtype: str, base_dtype: str) -> dict:
    B, S = cfg.train_batch_size, cfg.train_seq_len
    ab = _act_bytes(act_dtype)
    act = train_activation_bytes(d, S, B, ab)
    act_ckpt = train_activation_bytes(d, S, B, ab, checkpointing=True)
    pl = lora_params(d, cfg.lora_rank)
    full = {"weights": 4 * P, "gradients": 4 * P, "optimizer": 8 * P, "activations": act,
            "runtime_overhead": RUNTIME_OVERHEAD_BYTES}
    lora = {"weights": int(P * DTYPE_BYTES[base_dtype]), "lora_params": pl, "lora_states": 16 * pl,
            "activations": act + lora_activation_bytes(d, S, B, ab), "peft": PEFT_IMPORT_BYTES,
            "runtime_overhead": RUNTIME_OVERHEAD_BYTES}
    for e in (full, lora):
        e["total"] = sum(v for k, v in e.items() if k != "lora_params")
        e["total_with_grad_checkpointing"] = e["total"] - act + act_ckpt
    return {"batch_size": B, "seq_len": S, "activation_dtype": act_dtype, "full": full,
            "lora": {"rank": cfg.lora_rank, "base_dtype": base_dtype, **lora}}


def _dtype_key(name: str | None) -> str | None:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "F32": "fp32", "F16": "fp16",
            "BF16": "bf16"}.get(name or "")


def estimates(src: Source, det: Detection, cfg: CheckConfig, stored: dict, hw: dict) -> dict:
    d = dims_of(det)
    # encoders run one forward pass over the whole input: there is no KV cache to keep
    d["kv_cache"] = det.task not in ENCODER_TASKS
    formula = params_from_config(d) if det.task != "text-to-image" else None
    if formula and isinstance(det.full_config.get("vision_config"), dict):
        formula += vision_params_from_config(det.full_config["vision_config"], d.get("hidden"))
    P = stored["params"] or formula
    source = stored["source"] or ("config formula" if formula else None)
    if P is None and stored["bytes"]:  # no headers, no usable config: infer from file size (assume 2 bytes each)
        P, source = int(stored["bytes"] / 2), "file size / 2 (assumes fp16/bf16 weights)"
    context = d.get("context") or DEFAULT_CONTEXT
    files_bytes = sum(src.files.values())
    installed = files_bytes if det.gguf is None else files_bytes + int((P or 0) * 4)
    disk = {"model_files": files_bytes, "installed_model": installed, "environment": ENV_DISK_BYTES,
            "total_shared_env": installed + ENV_DISK_BYTES["shared (--system-site-packages)"],
            "free": hw["disk"]["free_bytes"], "path": hw["disk"]["path"]}
    disk["fits"] = disk["total_shared_env"] <= hw["disk"]["free_bytes"]
    if P is None:  # nothing to count: a config-only folder of a type without a formula (e.g. diffusers)
        return {"params": {"total": None, "source": None, "from_config_formula": None}, "dims": d,
                "context_length": context, "context_assumed": d.get("context") is None, "inference": None,
                "weights_bytes": None, "disk": disk,
                "unknown": "no safetensors/GGUF headers, no weight files and no formula for this model type"}
    seq = cfg.seq_len or context
    if stored.get("main_dtype"):
        stored_dtype = _dtype_key(stored["main_dtype"])
    elif det.gguf is not None:
        stored_dtype = None  # quantized blocks: any dtype is a conversion (the GGUF import makes fp32)
    else:
        stored_dtype = _dtype_key(det.full_config.get("torch_dtype") or det.full_config.get("dtype"))
    inference = {dt: estimate_inference(P, d, dt, seq, cfg.batch_size, stored_dtype) for dt in DTYPE_BYTES}
    out = {
        "params": {"total": int(P), "source": source, "from_config_formula": formula},
        "dims": d,
        "context_length": context, "context_assumed": d.get("context") is None,
        "inference": {"seq_len": seq, "batch_size": cfg.batch_size, "stored_dtype": stored_dtype,
                      "by_dtype": inference},
        "weights_bytes": {dt: e["weights"] for dt, e in inference.items()},
    }
    if det.task == "text-generation" and d.get("hidden") and d.get("layers"):
        cpu_act = "bf16" if hw["cpu"]["bf16"] else "fp32"
        out["training"] = {"cpu": estimate_training(P, d, cfg, cpu_act, "fp32"),
                           "gpu": estimate_training(P, d, cfg, "bf16", "bf16")}
    out["disk"] = disk
    return out


# ---------------------------------------------------------------------------------------------------------
# Compatibility with this machine.


def _fit_notes(need: int, avail: int | None) -> tuple[bool, list[str]]:
    if avail is None:
        return False, ["free memory unknown"]
    if need > avail:
        return False, [f"does not fit: needs {fmt_bytes(need)}, {fmt_bytes(avail)} available"]
    if need > CLOSE_TO_LIMIT * avail:
        return True, [f"close to limit ({need / avail:.0%} of available memory)"]
    return True, []


def compatibility(det: Detection, est: dict, hw: dict) -> dict:
    devices = [{"device": "cpu", "available": hw["ram"]["available_bytes"], "gpu": None}]
    for g in hw["gpus"]:
        devices.append({"device": f"cuda:{g['index']}", "available": g.get("vram_free_bytes") or g["vram_total_bytes"],
                        "gpu": g})
    rows = []
    if est["inference"] is None:
        return {"inference": [], "training": []}
    inf = est["inference"]["by_dtype"]
    for dev in devices:
        for dt, e in inf.items():
            if dev["gpu"] is None:
                need = e["total"] + FRAMEWORK_BYTES
            else:
                need = e["total"] - e["runtime_overhead"] - e["load_transient"] + GPU_CONTEXT_BYTES
            fits, notes = _fit_notes(need, dev["available"])
            if dev["gpu"] is None:
                if dt == "fp16":
                    notes.append("fp16 matmuls are slow on CPU: prefer fp32 or bf16")
                if dt == "bf16" and not hw["cpu"]["bf16"]:
                    notes.append("no native bf16 on this CPU (no AVX512-BF16/AMX): works, but slower than fp32")
                if dt in ("int8", "int4"):
                    notes.append("via GGUF + llama.cpp/Ollama (transformers' int8/int4 needs a GPU)")
            else:
                g = dev["gpu"]
                if dt == "bf16" and g.get("bf16") is False:
                    notes.append("this GPU has no bf16: use fp16")
                if dt in ("int8", "int4"):
                    notes.append("via bitsandbytes (pip install bitsandbytes) or GGUF")
                if hw.get("gpu_usable_by_torch") is False:
                    fits = False
                    notes.append("the installed torch is CPU-only: install a CUDA build of torch to use this GPU")
            rows.append({"device": dev["device"], "dtype": dt, "need_bytes": int(need),
                         "available_bytes": dev["available"], "fits": fits, "notes": notes})
    # "requires quantization": a device where no 16/32-bit dtype fits but int8/int4 does
    for dev in devices:
        drows = [r for r in rows if r["device"] == dev["device"]]
        if not any(r["fits"] for r in drows if r["dtype"] in ("fp32", "fp16", "bf16")):
            for r in drows:
                if r["fits"]:
                    r["notes"].insert(0, "requires quantization")
    training = []
    if "training" in est:
        for dev in devices:
            key = "cpu" if dev["gpu"] is None else "gpu"
            t = est["training"][key]
            for mode in ("lora", "full"):
                base = FRAMEWORK_BYTES if key == "cpu" else GPU_CONTEXT_BYTES
                need = t[mode]["total"] + base
                need_ckpt = t[mode]["total_with_grad_checkpointing"] + base
                fits, notes = _fit_notes(need, dev["available"])
                if not fits and need_ckpt <= (dev["available"] or 0):
                    fits, notes = True, [f"only with gradient checkpointing (needs {fmt_bytes(need_ckpt)})"]
                if key == "gpu" and hw.get("gpu_usable_by_torch") is False:
                    fits = False
                    notes.append("the installed torch is CPU-only")
                if key == "cpu" and fits:
                    notes.append("slow on CPU: fine for small models and short runs")
                training.append({"device": dev["device"], "mode": mode, "batch_size": t["batch_size"],
                                 "seq_len": t["seq_len"], "need_bytes": int(need), "need_bytes_grad_checkpointing":
                                 int(need_ckpt), "available_bytes": dev["available"], "fits": fits, "notes": notes})
    return {"inference": rows, "training": training}


def recommend(rows: list[dict], det: Detection, hw: dict) -> dict | None:
    """The best way to run it here with transformers: a GPU in 16-bit, else CPU fp32 (bf16 if native)."""
    order = []
    for g in hw["gpus"]:
        dev = f"cuda:{g['index']}"
        order += [(dev, "bf16" if g.get("bf16") else "fp16"), (dev, "fp16"), (dev, "int8"), (dev, "int4")]
    order += [("cpu", "bf16")] if hw["cpu"]["bf16"] else []
    order += [("cpu", "fp32"), ("cpu", "bf16"), ("cpu", "fp16")]
    by_key = {(r["device"], r["dtype"]): r for r in rows}
    for key in order:
        r = by_key.get(key)
        if r and r["fits"]:
            return {"device": key[0], "dtype": key[1], "torch_dtype": TORCH_DTYPE.get(key[1], key[1])}
    return None


# ---------------------------------------------------------------------------------------------------------
# The report.

SERVABLE_TASKS = ("text-generation",)


def check_model(ref: str, cfg: CheckConfig | None = None, hardware: dict | None = None,
                disk_path: str | Path = "~") -> dict:
    """Analyse a model reference (see module docstring) and return the report as a dict (JSON-ready).

    hardware: a probe_hardware() result to judge against (default: probe this machine); disk_path: where
    the model would be installed (free disk is measured there). Raises UserError for a model that cannot be
    found, read or recognised.
    """
    cfg = cfg or CheckConfig()
    t0 = time.time()
    src = open_source(ref, cfg)
    det = detect(src)
    headers = src.safetensors_headers() if det.gguf is None else {}
    stored = stored_weights(src, det, headers)
    hw = hardware or probe_hardware(disk_path)
    est = estimates(src, det, cfg, stored, hw)
    reqs = requirements(src, det)
    compat = compatibility(det, est, hw)
    rec = recommend(compat["inference"], det, hw)
    # what a CPU-only load (the install's post-test, a GPU-less server) should use
    cpu_rec = recommend([r for r in compat["inference"] if r["device"] == "cpu"], det, {**hw, "gpus": []})

    problems = list(det.problems)
    if stored["format"] == "pytorch-pickle":
        problems.append("weights are only in pickle format (.bin/.pt): refused for safety (pickle can run code); "
                        "use a safetensors version of the model")
    if est["inference"] is None:
        problems.append(f"memory cannot be estimated: {est['unknown']}")
    elif rec is None and det.loader:
        problems.append("does not fit this machine in any 16/32-bit dtype (see the compatibility table)")
    if not est["disk"]["fits"]:
        problems.append(f"not enough free disk at {est['disk']['path']}: needs "
                        f"{fmt_bytes(est['disk']['total_shared_env'])}")
    tok_cfg = src.read_json("tokenizer_config.json") or {}
    chat_template = bool((det.gguf or {}).get("chat_template") or tok_cfg.get("chat_template")
                         or any(f.endswith("chat_template.jinja") or f == "chat_template.json" for f in src.files))
    full = det.full_config
    return {
        "report_version": REPORT_VERSION,
        "ref": str(ref),
        "source": {"kind": src.kind, "path": str(src.gguf_file or src.root) if src.kind != "hub" else None,
                   "repo_id": src.repo_id, "revision": src.revision, "fingerprint": src.fingerprint(),
                   "extras": src.extras},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "task": det.task, "family": det.family, "architecture": det.architecture, "detected_by": det.detected_by,
            "loader": det.loader, "model_type": full.get("model_type"),
            "components": {k: {"library": v["library"], "class": v["class"]} for k, v in det.components.items()},
            "context_length": est["context_length"], "vocab_size": est["dims"].get("vocab"),
            "chat_template": chat_template, "config_dtype": full.get("torch_dtype") or full.get("dtype"),
            "gguf": {k: v for k, v in det.gguf.items() if k not in ("tensors", "chat_template")} if det.gguf else None,
        },
        "files": {"count": len(src.files), "total_bytes": sum(src.files.values()), "weight_format": stored["format"],
                  "weight_dtypes": stored["dtypes"], "stored_weight_bytes": stored["bytes"],
                  "list": dict(sorted(src.files.items())[:200])},
        "requirements": reqs,
        "estimates": {**est, "formulas": FORMULAS},
        "hardware": hw,
        "compatibility": compat,
        "verdict": {
            "supported": det.loader is not None and not det.problems,
            "servable": det.task in SERVABLE_TASKS,
            "runnable": rec is not None and not problems,
            "recommended": rec,
            "cpu_torch_dtype": cpu_rec["torch_dtype"] if cpu_rec else None,
            "problems": problems,
        },
        "check_seconds": round(time.time() - t0, 2),
    }


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GB", GiB), ("MB", MiB), ("KB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GB" else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def _fmt_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_report(r: dict) -> str:
    """The human-readable report (report.txt)."""
    m, e, hw, v, f, src = r["model"], r["estimates"], r["hardware"], r["verdict"], r["files"], r["source"]
    inf, params = e["inference"], e["params"]
    where = f"{src['repo_id']}@{(src['revision'] or '')[:12]}" if src["repo_id"] else src["path"]
    if params["total"]:
        size = f"{_fmt_params(params['total'])} ({params['total']:,}; {params['source']})"
    else:
        size = f"unknown ({e['unknown']})"
    if f["weight_format"]:
        weights = (f"{f['weight_format']} {', '.join(map(str, f['weight_dtypes']))}, "
                   f"{fmt_bytes(f['stored_weight_bytes'])} stored")
    else:
        weights = "none (config files only)"
    lines = [f"Model check: {r['ref']}", "=" * 78,
             f"type         {m['task']} ({m['family']}, {m['architecture'] or '-'})",
             f"detected by  {m['detected_by']}",
             f"source       {src['kind']} {where}",
             f"parameters   {size}",
             f"context      {e['context_length']}" + (" (assumed: not in the config)" if e["context_assumed"] else ""),
             f"chat         {'chat template present' if m['chat_template'] else 'no chat template'}",
             f"weights      {weights}; files total {fmt_bytes(f['total_bytes'])}"]
    if m["components"]:
        lines.append("components   " + ", ".join(f"{k}={c['class']}" for k, c in m["components"].items()))

    lines += ["", "Requirements"]
    for lib in r["requirements"]["libraries"]:
        lines.append(f"  {lib['name']:<22} {lib['installed'] or 'MISSING':<12} {lib['why']}")
    for sp in r["requirements"]["special"]:
        state = sp["installed"] or ("missing (optional)" if sp["optional"] else "MISSING")
        lines.append(f"  {sp['name']:<22} {state:<12} {sp['why']}; {sp['difficulty']}")
    if r["requirements"]["quantization"]:
        lines.append(f"  quantization: {json.dumps(r['requirements']['quantization'])[:120]}")
    lines += [f"  warning: {w}" for w in r["requirements"]["warnings"]]

    if inf is not None:
        cols = ("weights", "kv_cache", "activations", "load_transient", "runtime_overhead", "total")
        lines += ["", f"Inference memory (batch {inf['batch_size']}, {inf['seq_len']} tokens; stored dtype "
                  f"{inf['stored_dtype'] or 'quantized/unknown'})",
                  f"  {'dtype':<6} " + " ".join(f"{c:>10}" for c in
                                               ("weights", "kv cache", "activ.", "load tmp", "overhead", "total"))]
        for dt, x in inf["by_dtype"].items():
            lines.append(f"  {dt:<6} " + " ".join(f"{fmt_bytes(x[c]):>10}" for c in cols))
    if "training" in e:
        cpu = e["training"]["cpu"]
        lines += ["", f"Training memory (batch {cpu['batch_size']} x {cpu['seq_len']} tokens, AdamW, "
                  f"LoRA rank {cpu['lora']['rank']})"]
        for key in ("cpu", "gpu"):
            t = e["training"][key]
            full, lora = t["full"], t["lora"]
            lines.append(f"  {key}: full {fmt_bytes(full['total'])} (grad ckpt "
                         f"{fmt_bytes(full['total_with_grad_checkpointing'])}), LoRA {fmt_bytes(lora['total'])} "
                         f"(base {lora['base_dtype']}, {_fmt_params(lora['lora_params'])} adapter params), "
                         f"activations {t['activation_dtype']}")
    d = e["disk"]
    envs = ", ".join(f"{k} {fmt_bytes(b)}" for k, b in d["environment"].items())
    lines += ["", f"Disk: model files {fmt_bytes(d['model_files'])}, installed copy {fmt_bytes(d['installed_model'])}",
              f"      environment: {envs}", f"      free at {d['path']}: {fmt_bytes(d['free'])}"]

    gpus = "; ".join(f"{g['name']} {fmt_bytes(g['vram_total_bytes'])} ({fmt_bytes(g.get('vram_free_bytes'))} free)"
                     for g in hw["gpus"]) or "none"
    cpu_hw, ram = hw["cpu"], hw["ram"]
    lines += ["", "Hardware",
              f"  CPU   {cpu_hw['name']}: {cpu_hw['cores']} cores / {cpu_hw['threads']} threads"
              + (", native bf16" if cpu_hw["bf16"] else ""),
              f"  RAM   {fmt_bytes(ram['total_bytes'])} total, {fmt_bytes(ram['available_bytes'])} available",
              f"  GPU   {gpus}"]
    for title, key, col in (("inference", "inference", "dtype"), ("training", "training", "mode")):
        rows = r["compatibility"][key]
        if rows:
            lines += ["", f"Compatibility ({title})", f"  {'device':<8} {col:<6} {'run?':<5} {'needs':>10}  notes"]
            lines += [f"  {row['device']:<8} {row[col]:<6} {'yes' if row['fits'] else 'no':<5} "
                      f"{fmt_bytes(row['need_bytes']):>10}  {'; '.join(row['notes'])}" for row in rows]

    lines += ["", "Verdict"]
    if v["recommended"]:
        lines.append(f"  runs here: {v['recommended']['device']} {v['recommended']['dtype']}")
    if not v["servable"]:
        lines.append(f"  07_serve serves text-generation models; this is a {m['task']} model")
    lines += [f"  problem: {p}" for p in v["problems"]]
    if v["runnable"] and v["servable"]:
        lines.append("  OK: installable with 06_install.py")
    lines += ["", "Formulas"] + [f"  - {x}" for x in FORMULAS]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.txt", format_report(report))
    return out_dir


def default_report_dir(artifacts_dir: str | Path, ref: str) -> Path:
    """Where 05_check saves the report of a model named on the command line (06_install looks there first)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(ref).replace("/", "_")).strip(".-_")[:100] or "model"
    if Path(str(ref)).expanduser().exists():  # a path: its last part, plus a short hash of the full path
        p = Path(str(ref)).expanduser().resolve()
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", p.stem if p.is_file() else p.name).strip(".-_")[:80] or "model"
        name = f"{base}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
    return Path(artifacts_dir) / "05_check" / "models" / name


def run_check(cfg: Config, ref: str | None = None, out: str | Path | None = None,
              echo: Callable[[str], None] | None = print) -> Path:
    """05_check.py: check `ref` (None = this pipeline's export) and save report.txt + report.json.

    The pipeline's export goes to the 05_check stage dir (manifest written last); a model named on the command
    line to `out`, default <artifacts>/05_check/models/<name>/.
    """
    if ref is None:
        export = require_stage(cfg, "04_export", "Run the export stage first (snakemake export), or name a model: "
                                                 "05_check.py PATH|FILE.gguf|owner/name")
        report = check_model(str(export), cfg.check, disk_path=_install_disk(cfg))
        with stage_output(cfg, "05_check") as (tmp, extra):
            write_report(report, tmp)
            extra.update({"model": str(export), "verdict": report["verdict"]})
        out_dir = stage_dir(cfg, "05_check")
    else:
        report = check_model(ref, cfg.check, disk_path=_install_disk(cfg))
        out_dir = write_report(report, out or default_report_dir(cfg.artifacts_dir, ref))
    if echo:
        echo(format_report(report))
        echo(f"report: {out_dir / 'report.txt'} and report.json")
    return out_dir


def _install_disk(cfg: Config) -> Path:
    """Free disk is measured where models get installed."""
    return Path(cfg.install.models_dir).expanduser()
