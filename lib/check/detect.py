"""What a model is, from the structure of its files (never from its name): a chain of detectors, the first that
recognises the model wins. Each returns a Detection: task, family, architecture, loader and what stops loading it."""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.check.gguf_meta import read_gguf
from lib.check.source import Source
from lib.errors import UserError

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
    loader: str | None  # library that loads it: transformers / sentence-transformers / diffusers / llama.cpp
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
    # an embedding GGUF is served by llama.cpp itself (lib.handlers); a chat GGUF may also need transformers (GPU)
    loader = "llama.cpp" if task == "embedding" else "transformers" if arch in GGUF_CONFIG_MAPPING else None
    det = Detection(task=task, family=arch, architecture=arch, detected_by=f"GGUF general.architecture={arch!r}",
                    loader=loader, gguf=g,
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


def detect_ctranslate2(src: Source) -> Detection | None:
    """A Whisper model in CTranslate2's format (faster-whisper's): model.bin + vocabulary, and a config.json that
    has Whisper's alignment heads or language ids but no model_type."""
    if "model.bin" not in src.files or not any(v in src.files for v in ("vocabulary.txt", "vocabulary.json")):
        return None
    cfg = src.read_json("config.json") or {}
    if not isinstance(cfg, dict) or not any(k in cfg for k in ("alignment_heads", "lang_ids", "suppress_ids")):
        return None  # another CTranslate2 model: detect() names it in its error
    return Detection(task="automatic-speech-recognition", family="whisper (CTranslate2)", architecture=None,
                     detected_by="model.bin + vocabulary + config.json with Whisper's alignment heads (CTranslate2)",
                     loader="faster-whisper", full_config=cfg)


DETECTORS = [detect_diffusers, detect_config_json, detect_gguf, detect_alt_config, detect_ctranslate2]


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
