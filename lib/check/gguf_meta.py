"""A GGUF file's header read without its tensors: architecture, hyper-parameters, tokenizer and tensor table."""

from __future__ import annotations

from pathlib import Path

from lib.errors import UserError

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
