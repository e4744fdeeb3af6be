# Models at Home — the pipeline DAG.
#
#   snakemake --cores all                                  # the embedded demo (config/default.yaml)
#   snakemake --cores all --configfile config/smoke.yaml   # any other config file
#   snakemake --cores all tokens                           # stop after a stage (targets: data, tokenizer, tokens, ...)
#
# Every stage writes artifacts/<NN_stage>/<hash>/ where <hash> covers only that stage's own config section, the
# hashes of the stages it reads and a format version (lib/config.py). Editing one section reruns that stage and
# what depends on it; reverting the edit finds the old directories again, so nothing runs. A directory is complete
# iff its manifest.json exists, and that file is each rule's declared output.
#
# The config file is deliberately NOT a rule input: its mtime would rerun everything on any edit. The hashes in the
# output paths carry the config instead. Each rule's own script is an input, so editing a script reruns its stage.

import sys
from pathlib import Path

from lib.config import load_config, stage_dir

SRC = Path(workflow.basedir)  # the scripts live beside this file; artifacts go to the working directory
DEFAULT_CONFIG = "config/default.yaml" if Path("config/default.yaml").is_file() else str(SRC / "config/default.yaml")
CONFIG_FILE = workflow.overwrite_configfiles[-1] if workflow.overwrite_configfiles else DEFAULT_CONFIG
CFG = load_config(CONFIG_FILE)  # validates: a bad config stops here with the key and what was expected
PY = sys.executable


def script(name):
    return str(SRC / name)
LOGS = f"{CFG.artifacts_dir}/logs"


ENV = "envs/pipeline.yaml"


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
        config=CONFIG_FILE,
    conda:
        ENV
    shell:
        "{params.py} {input.script} --config {params.config} > {log} 2>&1"


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
        config=CONFIG_FILE,
    conda:
        ENV
    shell:
        "{params.py} {input.script} --config {params.config} > {log} 2>&1"


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
        config=CONFIG_FILE,
    conda:
        ENV
    shell:
        "RAYON_NUM_THREADS={threads} {params.py} {input.script} --config {params.config} --encode > {log} 2>&1"


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
        config=CONFIG_FILE,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.py} {input.script} --config {params.config} > {log} 2>&1"


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
        config=CONFIG_FILE,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.py} {input.script} --config {params.config} > {log} 2>&1"


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
        config=CONFIG_FILE,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} {params.py} {input.script} --config {params.config} --export > {log} 2>&1"


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
        config=CONFIG_FILE,
    conda:
        ENV
    shell:
        "{params.py} {input.script} --config {params.config} --quiet-config > {log} 2>&1"




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
        config=CONFIG_FILE,
    conda:
        ENV
    shell:
        "{params.py} {input.script} install --config {params.config} --quiet-config > {log} 2>&1"
