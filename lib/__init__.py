"""Models at Home: the library behind the numbered scripts.

The folders follow the pipeline (data/ -> train/ -> export/ -> check/ -> install/ -> serving/, with report/ and
studio/ on top); the shared core sits at this level: config/, stages, artifacts, fingerprint, hub, hardware, chat,
names, errors, cli. Imports point from the stage folders down to the core, never sideways between stages.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout (or an install's runtime/ copy): scripts, Snakefile, config/
