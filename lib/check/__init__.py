"""Model check: what a model is, what it needs, how much memory and disk it takes, and whether it fits this
machine, without downloading or reading its weights.

A model reference is a local HF directory, a .gguf file, a Hugging Face hub id (owner/name: only metadata is
fetched: the file list with sizes, small config files, safetensors headers) or the pipeline's own export dir.
Its type is detected from its files' structure by a chain of detectors (never from its name). Estimates come
from exact parameter counts (safetensors / GGUF headers) where present, else from config formulas; every
formula is written into the report. Used by 05_check.py and by lib/install/installer.py (which refuses what does not fit).

One module per job, in the order a check runs:
    source     the reference opened: local dir, .gguf file or hub repo (metadata only), safetensors headers
    gguf_meta  a GGUF file's header
    detect     the detectors: task, family, architecture, loader
    formulas   hyper-parameters in one vocabulary, parameter counts, memory and disk estimates (FORMULAS)
    verdict    requirements, fits-or-not per device and dtype, the recommendation
    report     check_model() over all of them, the report as text/JSON, 05_check's stage
"""

from lib.check.checker import (
                                REPORT_VERSION,
                                check_code,
                                check_model,
                                default_report_dir,
                                format_report,
                                run_check,
                                write_report,
)
from lib.check.detect import Detection, detect
from lib.check.formulas import (
                                FRAMEWORK_BYTES,
                                RUNTIME_OVERHEAD_BYTES,
                                TORCH_DTYPE,
                                GiB,
                                MiB,
                                dims_of,
                                estimate_inference,
                                estimate_training,
                                fmt_bytes,
                                kv_cache_bytes,
                                params_from_config,
)
from lib.check.source import Source, open_source, read_safetensors_header

__all__ = ["Detection", "detect", "FRAMEWORK_BYTES", "RUNTIME_OVERHEAD_BYTES", "TORCH_DTYPE", "GiB", "MiB", "dims_of",
           "estimate_inference", "estimate_training", "fmt_bytes", "kv_cache_bytes", "params_from_config",
           "REPORT_VERSION", "check_code", "check_model", "default_report_dir", "format_report", "run_check",
           "write_report", "Source", "open_source", "read_safetensors_header"]
