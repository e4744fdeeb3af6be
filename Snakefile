# Models at Home — the pipeline DAG.
#
#   snakemake --cores all                                  # the embedded demo (config/default.yaml)
#   snakemake --cores all --configfile config/smoke.yaml   # any other config file
#   snakemake --cores all tokens                           # stop after a stage (targets: data, tokenizer, tokens, ...)
#
# Every stage writes artifacts/<NN_stage>/<hash>/ where <hash> covers that stage's own config section, the contents
# of the local files it reads, the code it runs (its script and the lib modules behind it), the hashes of the stages
# it reads and a format version (lib/config.py, lib/fingerprint.py). Editing one of those reruns that stage and what
# depends on it; reverting the edit finds the old directories again, so nothing runs. A directory is complete iff
# its manifest.json exists, and that file is each rule's declared output.
#
# Neither the config files nor the code are rule inputs: their mtimes would rerun everything on any edit. The
# hashes in the output paths carry them instead.
#   snakemake --cores all --configfile config/smoke.yaml --configfile mine.yaml   # merged in order, later wins
#   snakemake --cores all --config 'tokenizer={"vocab_size": 1024}'              # or tokenizer.vocab_size=1024

import shlex
import sys
from pathlib import Path

from lib.config import load_config, overrides_from_mapping, stage_dir

SRC = Path(workflow.basedir)  # the scripts live beside this file; artifacts go to the working directory
DEFAULT_CONFIG = "config/default.yaml" if Path("config/default.yaml").is_file() else str(SRC / "config/default.yaml")
# Every --configfile, merged in order as Snakemake merges them, then every --config key=value on top (nested
# values and dotted keys alike): the same config the scripts below load from the same arguments.
CONFIG_FILES = [str(f) for f in workflow.overwrite_configfiles] or [DEFAULT_CONFIG]
OVERRIDES = overrides_from_mapping(dict(workflow.config_settings.config or {}))
CFG = load_config(CONFIG_FILES, OVERRIDES)  # validates: a bad config stops here with the key and what was expected
CONFIG_ARGS = " ".join([*(f"--config {shlex.quote(f)}" for f in CONFIG_FILES),
                        *(f"--set {shlex.quote(o)}" for o in OVERRIDES)])
# Rules run the interpreter that runs Snakemake (.venv's, whether or not it is activated), or, with `--sdm conda`,
# `python3` of the rule's conda environment (envs/pipeline.yaml), which Snakemake puts first on PATH.
USES_CONDA = "CONDA" in {m.name for m in (workflow.deployment_settings.deployment_method or ())}
PY = "python3" if USES_CONDA else sys.executable
ENV = "envs/pipeline.yaml"


def config_args(wildcards, output):
    """The scripts' config arguments. A function of the output, so Snakemake treats it as derived from the output
    path (which carries the stage hash) and does not rerun a job whose hash is unchanged when an unrelated
    --config value differs."""
    return CONFIG_ARGS


def script(name):
    return str(SRC / name)
LOGS = f"{CFG.artifacts_dir}/logs"


def done(stage):
    """The declared output of a stage: its manifest, written last."""
    return f"{stage_dir(CFG, stage)}/manifest.json"


def log(stage):
    return f"{LOGS}/{stage}/{stage_dir(CFG, stage).name}.log"


def bench(stage):
    return f"{LOGS}/{stage}/{stage_dir(CFG, stage).name}.benchmark.tsv"


# The install lands outside the working directory, in the models dir (install.models_dir, `06_install.py config`,
# default ~/LLM/models), named install.name or after the config file (homellm for default.yaml, homellm-smoke for
# smoke.yaml). The rule's declared output is a receipt in artifacts/06_install/<hash>/, never a file in the models
# dir: Snakemake deletes a job's outputs before it reruns it, and nothing of an installed model may be deleted
# before its replacement is complete. No --force either: the installer replaces only an install that came from
# this same config, and refuses one from elsewhere with the way to replace it on purpose.
INSTALLED = done("06_install")


rule all:
    input:
        done("04_export"),
        done("05_check"),
        INSTALLED,
        done("08_report"),


rule data:
    input:
        done("01_data"),


rule tokenizer:
    input:
        done("02_tokenizer"),


rule tokens:
    input:
        done("02_tokens"),


rule pretrained:
    input:
        done("03_pretrain"),


rule sft_model:
    input:
        done("04_sft"),


rule exported:
    input:
        done("04_export"),


rule prepare_data:
    input:
        script=script("01_prepare_data.py"),
    output:
        manifest=done("01_data"),
    log:
        log("01_data"),
    benchmark:
        bench("01_data")
    params:
        py=PY,
        config=config_args,
    conda:
        ENV
    shell:
        "{params.py} {input.script} {params.config} > {log} 2>&1"


rule train_tokenizer:
    input:
        script=script("02_train_tokenizer.py"),
        data=[done(s) for s in ("01_data",) if not CFG.tokenizer.pretrained],
    output:
        manifest=done("02_tokenizer"),
    log:
        log("02_tokenizer"),
    benchmark:
        bench("02_tokenizer")
    params:
        py=PY,
        config=config_args,
    conda:
        ENV
    shell:
        "{params.py} {input.script} {params.config} > {log} 2>&1"


rule encode_corpus:
    input:
        script=script("02_train_tokenizer.py"),
        data=done("01_data"),
        tokenizer=done("02_tokenizer"),
    output:
        manifest=done("02_tokens"),
    log:
        log("02_tokens"),
    benchmark:
        bench("02_tokens")
    threads: workflow.cores
    params:
        py=PY,
        config=config_args,
    conda:
        ENV
    shell:
        "RAYON_NUM_THREADS={threads} {params.py} {input.script} {params.config} --encode > {log} 2>&1"


rule pretrain:
    input:
        script=script("03_pretrain.py"),
        tokens=done("02_tokens"),
        tokenizer=done("02_tokenizer"),
    output:
        manifest=done("03_pretrain"),
    log:
        log("03_pretrain"),
    benchmark:
        bench("03_pretrain")
    threads: workflow.cores
    params:
        py=PY,
        config=config_args,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.py} {input.script} {params.config} > {log} 2>&1"


rule sft:
    input:
        script=script("04_sft.py"),
        base=[done(s) for s in ("03_pretrain",) if CFG.sft.base_model is None],
    output:
        manifest=done("04_sft"),
    log:
        log("04_sft"),
    benchmark:
        bench("04_sft")
    threads: workflow.cores
    params:
        py=PY,
        config=config_args,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.py} {input.script} {params.config} > {log} 2>&1"


rule export:
    input:
        script=script("04_sft.py"),
        sft=done("04_sft"),
    output:
        manifest=done("04_export"),
    log:
        log("04_export"),
    benchmark:
        bench("04_export")
    threads: workflow.cores
    params:
        py=PY,
        config=config_args,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.py} {input.script} {params.config} --export > {log} 2>&1"


rule checked:
    input:
        done("05_check"),


rule check:
    input:
        script=script("05_check.py"),
        export=done("04_export"),
    output:
        manifest=done("05_check"),
    log:
        log("05_check"),
    params:
        py=PY,
        config=config_args,
    conda:
        ENV
    shell:
        "{params.py} {input.script} {params.config} --quiet-config > {log} 2>&1"




rule installed:
    input:
        INSTALLED,


rule install:
    input:
        script=script("06_install.py"),
        check=done("05_check"),
    output:
        receipt=INSTALLED,
    log:
        log("06_install"),
    params:
        py=PY,
        config=config_args,
    conda:
        ENV
    shell:
        "{params.py} {input.script} install {params.config} --quiet-config > {log} 2>&1"


rule report:
    input:
        done("08_report"),


rule report_card:
    input:
        script=script("08_report.py"),
        check=done("05_check"),
    output:
        manifest=done("08_report"),
    log:
        log("08_report"),
    benchmark:
        bench("08_report")
    threads: workflow.cores
    params:
        py=PY,
        config=config_args,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.py} {input.script} {params.config} --quiet-config > {log} 2>&1"


onsuccess:
    # the report card's summary on the terminal (the stage itself printed it into its log)
    card = stage_dir(CFG, "08_report") / "report.json"
    if card.is_file():
        import json

        from lib.report import summary

        print(summary(json.loads(card.read_text()), card.parent))
