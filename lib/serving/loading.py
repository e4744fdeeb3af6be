"""Loading a model to serve: which engine decodes it (llama.cpp for a model with a GGUF file on a CPU, else torch),
the device, the tokenizer, the stop ids and the context, as one LoadedModel the engine, API, UI and CLI share.

    loaded = load_model(resolve_model(None, cfg), device="auto", engine="auto")
    loaded.describe()        # id, source, parameters, context, device/dtype, engine
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lib.atomic import atomic_dir
from lib.chat import end_of_turn_ids, looks_instruction_tuned, serving_template
from lib.data.tokenizer import load_tokenizer
from lib.errors import UserError
from lib.export.convert import gguf_to_hf
from lib.export.llama_tools import lora_to_gguf
from lib.handlers import torch_engine
from lib.model.hf_io import load_hf, save_model_dir
from lib.models_dir import ADAPTERS, MODEL, TOKENIZER, adapters_of, verify_install
from lib.serving import llamacpp
from lib.serving.engines import loader
from lib.serving.hf_engine import TransformersLM
from lib.serving.llamacpp import LlamaCppModel
from lib.serving.resolve import ModelRef
from lib.serving.torch_engine import TorchDecoder


@dataclass
class LoadedModel:
    ref: ModelRef
    # the decoder (lib.serving.engines.Decoder): lib.serving.torch_engine.TorchDecoder over HomeLLM (engine "torch")
    # or TransformersLM ("transformers"), or lib.serving.llamacpp.LlamaCppModel ("llama.cpp")
    model: Any
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    context_length: int
    stop_token_ids: list[int]
    device: str
    dtype: str
    parameters: int
    config: dict = field(default_factory=dict)  # the model's config.json
    # the longest token's text: a text longer than context_length * this cannot fit, whatever it says
    max_token_chars: int = 64
    engine: str = "torch"  # "torch", "transformers" or "llama.cpp"
    engine_note: str = ""  # why this engine (shown at start and in /info)

    def stream(self, prompt_ids: list[int], params, record=None) -> Iterator[int]:
        """New token ids for a prompt (lib.model.generate.stream's contract, `record` included)."""
        return self.model.stream(prompt_ids, params, record)

    def score(self, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """What the prompt `ids` says of itself: log p(ids[i] | ids[:i]) for i >= 1, and at every position the `top`
        most likely next tokens with their log-probabilities (the last position's: the token that would come next).
        One forward pass over the whole prompt (llama.cpp: in batch-sized chunks); call it on the engine's thread."""
        return self.model.score(ids, top)

    @property
    def id(self) -> str:
        """What the page's model picker keys it by (ModelRef.id)."""
        return self.ref.id

    @property
    def name(self) -> str:
        """Its name on the API (ModelRef.served_name)."""
        return self.ref.served_name

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def surely_too_long(self, n_chars: int) -> bool:
        """True when a text of n_chars characters cannot fit the context (checked before spending time tokenizing)."""
        return n_chars > self.context_length * self.max_token_chars

    def describe(self) -> dict:
        """What /info and the UI show about the model."""
        return {
            "id": self.name, "source": self.ref.source, "path": str(self.ref.path or self.ref.gguf),
            "gguf": str(self.ref.gguf) if self.ref.gguf else None, "engine": self.engine,
            "engine_note": self.engine_note,
            "architecture": (self.config.get("architectures") or [self.config.get("model_type")])[0],
            "parameters": self.parameters, "context_length": self.context_length,
            "vocab_size": self.config.get("vocab_size"), "device": self.device, "dtype": self.dtype,
            "chat_template": self.has_chat_template, "stop_token_ids": self.stop_token_ids, "info": self.ref.info,
        }


def adapter_ref(ref: ModelRef, name: str) -> ModelRef:
    """The installed chat model `ref` with its LoRA adapter `name` (trained by its train.sh), to load: checked
    here, made ready by load_model for the engine it gets (with_adapter)."""
    if ref.install_dir is None:
        raise UserError(f"--adapter {name}: adapters belong to installed models (train.sh writes them); "
                        f"{ref.id} is not an install")
    if name not in adapters_of(ref.install_dir):
        raise UserError(f"--adapter {name}: {ref.install_dir.name} has no such adapter (it has: "
                        f"{', '.join(adapters_of(ref.install_dir)) or 'none'}); train one with its train.sh")
    return replace(ref, id=f"{ref.install_dir.name}+{name}", adapter=name)


def with_adapter(ref: ModelRef, as_lora_gguf: bool) -> ModelRef:
    """`ref` (see adapter_ref) ready to load. For the llama.cpp engine the adapter is converted once to llama.cpp's
    LoRA GGUF (<install>/adapters/NAME/adapter.gguf) and applied over the install's GGUF as it is (quantized);
    for torch its weights are merged once into <install>/adapters/NAME/merged/ (atomically), served like any HF
    folder."""
    name = ref.adapter
    folder = ref.install_dir / ADAPTERS / name
    adapter = folder / "adapter"
    base = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    if not (base / "config.json").is_file():  # the install moved: its model/ (or kept base) is where it is now
        base = next((p for p in (ref.install_dir / MODEL, ref.install_dir / ADAPTERS / ".base-hf")
                     if any(p.glob("*.safetensors"))), base)
    if as_lora_gguf:
        lora = folder / "adapter.gguf"
        if not lora.is_file():
            print(f"converting adapter {name} to llama.cpp's LoRA format (once) …", file=sys.stderr, flush=True)
            tmp = folder / f".adapter-{os.getpid()}.gguf"
            try:
                lora_to_gguf(adapter, base, tmp, label=f"adapter {name}")
                os.replace(tmp, lora)
            finally:
                tmp.unlink(missing_ok=True)
        return replace(ref, adapter=None, lora=lora)
    merged = folder / "merged"
    if not (merged / "config.json").is_file():
        print(f"merging adapter {name} into {base.name} (once) …", file=sys.stderr, flush=True)
        from lib.train.base_model import merge_adapter  # peft: a chat install's train.sh brings it, serving does not

        with atomic_dir(merged) as tmp:
            save_model_dir(merge_adapter(base, adapter), tmp, load_tokenizer(base))
    return ModelRef(id=ref.id, path=merged, source=ref.source, info=ref.info, gguf=None)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu (or auto)")
    return device


def choose_engine(ref: ModelRef, device: str, requested: str = "auto") -> tuple[str, str]:
    """("llama.cpp" | "torch", why). llama.cpp needs a GGUF file, the CPU and an importable llama-cpp-python."""
    if requested == "torch":
        return "torch", "engine torch (asked for)"
    ok, why_not = llamacpp.available()
    problems = []
    if ref.gguf is None:
        problems.append("the model has no GGUF file (export or install one to serve it with llama.cpp)")
    if device != "cpu":
        problems.append(f"llama.cpp here runs on the CPU and the model is to run on {device}")
    if not ok:
        problems.append(why_not)
    if not problems:
        return "llama.cpp", f"engine llama.cpp on {ref.gguf.name}"
    if requested == "llama.cpp":
        raise UserError("serve.engine llama.cpp: " + "; ".join(problems))
    slower = "; the torch engine decodes several times slower on a CPU" if device == "cpu" and ref.gguf else ""
    return "torch", "engine torch: " + "; ".join(problems) + slower


def load_model(ref: ModelRef, device: str = "auto", engine: str = "auto", max_active: int = 4,
               max_context: int = 4096) -> LoadedModel:
    """Load `ref` for serving with the engine `choose_engine` picks, and check that tokenizer and model fit."""
    device = pick_device(device)
    if ref.install_dir is not None:  # an installed model is served only if every file matches its SHA256SUMS
        verify_install(ref.install_dir)
    engine, note = choose_engine(ref, device, engine)
    if ref.adapter:  # with its LoRA adapter (start.sh --adapter, or picked in the UI)
        ref = with_adapter(ref, as_lora_gguf=engine == "llama.cpp")
        note += f"; LoRA adapter {ref.id.rsplit('+', 1)[-1]} " + ("applied" if ref.lora else "merged")
    if engine == "torch":  # the torch engines: ours for the Llama architecture, transformers' for the rest
        engine = torch_engine(_read_config(_hf_folder(ref)))
    return loader(engine, "chat")(ref, device, note, max_active, max_context)


def _hf_folder(ref: ModelRef) -> Path:
    """The model's HF folder; a GGUF alone is dequantised into one first (once per process)."""
    return ref.path if ref.path is not None else _gguf_as_hf(ref.gguf)


def _read_config(hf_dir: Path) -> dict:
    try:
        return json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{hf_dir / 'config.json'}: cannot read the model config ({e})") from None


def load_homellm(ref: ModelRef, device: str, note: str, max_active: int = 4, max_context: int = 4096) -> LoadedModel:
    """Engine "torch": our HomeLLM from the HF folder (the Llama architecture, model_type "llama")."""
    def net(hf_dir, dtype):
        model = load_hf(hf_dir, device=device, dtype=dtype)
        return model.eval(), model.args.max_seq_len

    return _load_torch(ref, device, note, max_context, "torch", net)


def load_transformers(ref: ModelRef, device: str, note: str, max_active: int = 4,
                      max_context: int = 4096) -> LoadedModel:
    """Engine "transformers": transformers' own class for any other causal LM (safetensors only, no remote code)."""
    def net(hf_dir, dtype):
        model = TransformersLM.load(hf_dir, device, dtype)
        return model, model.context_length

    return _load_torch(ref, device, note, max_context, "transformers", net)


def _load_torch(ref: ModelRef, device: str, note: str, max_context: int, engine: str, load_net) -> LoadedModel:
    """A model from its HF folder (safetensors only), decoded by lib.model.generate through TorchDecoder. Replies use
    at most max_context tokens of the model's context (serve.max_context, as llama.cpp's cache; 05_check sizes
    memory at it)."""
    import torch

    hf_dir = _hf_folder(ref)
    config = _read_config(hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    # bf16 halves memory and is fast on GPUs; CPUs serve in fp32 (bf16 matmuls are slow on most of them).
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    net, context = load_net(hf_dir, dtype)
    if engine == "transformers":
        note = note.replace("engine torch", f"engine transformers ({config.get('model_type')})", 1)
    n_vocab = config.get("vocab_size")
    largest_id = max(tokenizer.get_vocab().values())
    if isinstance(n_vocab, int) and largest_id >= n_vocab:
        raise UserError(f"{hf_dir}: the tokenizer has token id {largest_id} but the model's vocab_size is {n_vocab} "
                        f"(config.json); the tokenizer files do not belong to this model")
    note = _with_template(tokenizer, note, hf_dir.name, hf_dir.parent.name, config.get("_name_or_path"))
    stop_ids = sorted(end_of_turn_ids(tokenizer, hf_dir))
    return LoadedModel(ref=ref, model=TorchDecoder(net, tokenizer, stop_ids), tokenizer=tokenizer,
                       context_length=min(int(context), max_context), stop_token_ids=stop_ids, device=device,
                       dtype=str(dtype).split(".")[-1], parameters=net.num_params(), config=config,
                       # a byte-level token's string has one character per byte, so it bounds the decoded length
                       max_token_chars=max(len(t) for t in tokenizer.get_vocab()), engine=engine, engine_note=note)


def _with_template(tokenizer, note: str, *names) -> str:
    """Give the tokenizer the template it is served with (lib.chat.serving_template, told whether the model's
    `names` say it is instruction-tuned); the note says which."""
    template, why = serving_template(tokenizer, looks_instruction_tuned(*names))
    tokenizer.chat_template = template
    return f"{note}; {why}" if why else note


@functools.cache
def _gguf_as_hf(gguf: Path) -> Path:
    import tempfile


    out = Path(tempfile.mkdtemp(prefix="serve-gguf-")) / gguf.stem
    print(f"converting {gguf} to HF weights for the torch engine (llama.cpp would serve it as is) …",
          file=sys.stderr, flush=True)
    return gguf_to_hf(gguf, out)


def gguf_tokenizer(gguf: Path):
    """The tokenizer (and chat template) stored in a GGUF file, as a transformers tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many kinds for a tokenizer it cannot rebuild
        raise UserError(f"{gguf}: cannot read its tokenizer ({type(e).__name__}: {e}); serve the HF folder of "
                        "the model instead") from None


def load_llamacpp(ref: ModelRef, device: str, note: str, max_active: int = 4, max_context: int = 4096) -> LoadedModel:
    """Engine "llama.cpp": the GGUF file on the CPU (its tokenizer from the HF folder beside it, else from the GGUF)."""
    saved = ref.gguf.parent / TOKENIZER  # an install's copy of the GGUF's tokenizer
    tokenizer = (load_tokenizer(ref.path) if ref.path is not None else load_tokenizer(saved)
                 if (saved / "tokenizer_config.json").is_file() else gguf_tokenizer(ref.gguf))
    model = LlamaCppModel(ref.gguf, n_ctx_seq=max_context, n_seq=max_active, lora=ref.lora)
    if len(tokenizer) > model.n_vocab:
        raise UserError(f"{ref.gguf}: the tokenizer has {len(tokenizer)} tokens but the GGUF model only {model.n_vocab}"
                        "; the tokenizer files do not belong to this model")
    config = json.loads((ref.path / "config.json").read_text(encoding="utf-8")) if ref.path is not None else {}
    config.setdefault("vocab_size", model.n_vocab)
    stop_ids = sorted(end_of_turn_ids(tokenizer, ref.path if ref.path is not None else ref.gguf.parent))
    note = _with_template(tokenizer, note, ref.gguf.stem, model.meta("general.name"), model.meta("general.finetune"),
                          ref.path.name if ref.path is not None else None)
    quant = re.search(r"(?i)(q\d+_[a-z0-9_]+|i?q\d_\w+|bf16|f16|f32)$", ref.gguf.stem)
    quant = quant.group(1) if quant else "model"
    return LoadedModel(ref=ref, model=model, tokenizer=tokenizer, context_length=model.n_ctx_seq,
                       stop_token_ids=stop_ids, device="cpu", dtype=f"gguf {quant}", parameters=model.n_params,
                       config=config, max_token_chars=max(len(t) for t in tokenizer.get_vocab()),
                       engine="llama.cpp", engine_note=note)
