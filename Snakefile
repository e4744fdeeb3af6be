# Models at Home — the pipeline DAG.
#
#   snakemake --cores all                                  # the embedded demo (config/default.yaml)
#   snakemake --cores all --configfile config/smoke.yaml   # any other config file
#   snakemake --cores all tokens                           # stop after a stage (targets: data, tokenizer, tokens, ...)
#
# The stages and their rules come from the stage map (lib/stages.py). Every stage writes artifacts/<NN_stage>/<hash>/
# where <hash> covers the config slice the stage declares, the contents of the local files it reads (not where they
# live), the code it runs (its script and the lib modules behind it, comments aside), the hashes of the stages it
# reads and a format version (lib/stages.py, lib/fingerprint.py). Editing one of those reruns that stage and what
# depends on it; reverting the edit finds the old directories again, so nothing runs. A directory is complete iff
# its manifest.json exists, and that file is each rule's declared output.
#
# Neither the config files nor the code (the scripts included) are rule inputs: their mtimes would rerun everything
# on any edit. The hashes in the output paths carry them instead, and the workflow profile (profiles/default/) turns
# off Snakemake's own rerun triggers (mtime, input set, params, code), which a copied, moved or upgraded project
# would set off with nothing changed: moving the project folder reruns nothing.
#   snakemake --cores all --configfile config/smoke.yaml --configfile mine.yaml   # merged in order, later wins
#   snakemake --cores all --config 'tokenizer={"vocab_size": 1024}'              # or tokenizer.vocab_size=1024

import shlex
import sys
from pathlib import Path

from lib.config import load_config, overrides_from_mapping
from lib.stages import STAGES, stage_dir

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


def interpreter(wildcards, output):
    """The interpreter the scripts run with (a function of the output, as config_args: a new venv elsewhere is not
    a new result)."""
    return shlex.quote(PY)


def script_of(name):
    """The stage's script, found beside the Snakefile wherever the project lives (not a rule input: its contents
    are in the stage hash, and its path and mtime change when the project is copied or moved)."""
    return lambda wildcards, output: shlex.quote(str(SRC / name))


def done(stage):
    """The declared output of a stage: its manifest, written last."""
    return f"{stage_dir(CFG, stage)}/manifest.json"


LOGS = f"{CFG.artifacts_dir}/logs"


rule all:
    input:
        [done(s.name) for s in STAGES if s.runs(CFG)],


# One rule per stage of the stage map (lib/stages.py), and a short target per stage to stop after it
# (`snakemake --cores all tokens`). The install lands in the models dir (install.models_dir, `06_install.py config`,
# default ~/LLM/models); its declared output is a receipt in artifacts/06_install/<hash>/, never a file in the models
# dir: Snakemake deletes a job's outputs before it reruns it, and nothing of an installed model may be deleted before
# its replacement is complete. No --force either: the installer replaces only an install from this same config.
for st in STAGES:
    folder = stage_dir(CFG, st.name)
    env = "".join(f"{var}={{threads}} " for var in st.threads_env)  # e.g. "OMP_NUM_THREADS={threads} "
    rule:
        name:
            st.rule
        input:
            upstream=[done(u) for u in st.reads(CFG)],
        output:
            manifest=done(st.name),
        log:
            f"{LOGS}/{st.name}/{folder.name}.log",
        benchmark:
            f"{LOGS}/{st.name}/{folder.name}.benchmark.tsv"
        threads: workflow.cores if st.threads_env else 1
        params:
            py=interpreter,
            script=script_of(st.script),
            config=config_args,
            args=" ".join(st.args),
        conda:
            ENV
        shell:
            f"{env}{{params.py}} {{params.script}} {{params.args}} {{params.config}} > {{log}} 2>&1"

    rule:
        name:
            st.target
        input:
            done(st.name),


onsuccess:
    # the report card's summary on the terminal (the stage itself printed it into its log)
    card = stage_dir(CFG, "08_report") / "report.json"
    if card.is_file():
        import json

        from lib.report.card import summary

        print(summary(json.loads(card.read_text()), card.parent))
