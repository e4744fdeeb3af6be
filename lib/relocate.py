"""A venv that moved with the project: `mv` or `cp -r` of the project folder takes .venv along, but pip wrote the
venv's path into the first line of every script it installed (.venv/bin/snakemake, pip, …) and into `activate`, so
those point at the old place (or at nothing). install.sh calls this before anything else; it points them here,
which is what `python -m venv` and pip would have written in this place. The interpreter itself is a link to the
base Python and works wherever the venv is.

    python -m lib.relocate .venv        # prints what it repaired, if anything
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SHEBANG = re.compile(rb"^#!(\S+)/bin/python[\d.]*\s*$")  # pip's first line: #!<venv>/bin/python
# pip's sh wrapper, for a path too long for #! or holding a space: '''exec' '<venv>/bin/python' "$0" "$@"
WRAPPED = re.compile(rb"^'''exec' ['\"]?(.+?)/bin/python[\d.]*['\"]? ")


def recorded_prefix(venv: Path) -> str | None:
    """The venv path pip wrote into .venv/bin/pip (or the first script that has one); None when none says."""
    for script in sorted((venv / "bin").iterdir()):
        if script.is_file() and not script.is_symlink():
            with open(script, "rb") as f:
                head = f.read(512).splitlines()[:3]
            for line in head:
                m = SHEBANG.match(line) or WRAPPED.match(line)
                if m:
                    return m.group(1).decode()
    return None


def repair_venv(venv: Path) -> str | None:
    """Point the venv's scripts and activate files at where the venv is now; the old path when something changed."""
    venv = Path(venv).absolute()
    old = recorded_prefix(venv)
    if old is None or old == str(venv) or Path(old).resolve() == venv.resolve():
        return None
    old_b, new_b = old.encode(), str(venv).encode()
    for path in (venv / "bin").iterdir():
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if path.name.startswith("activate"):  # VIRTUAL_ENV=... anywhere in the file
            fixed = data.replace(old_b, new_b)
        elif data.startswith(b"#!"):  # only the first lines: the interpreter line (or pip's sh wrapper)
            lines = data.split(b"\n", 3)
            fixed = b"\n".join([line.replace(old_b + b"/bin/python", new_b + b"/bin/python") for line in lines[:3]]
                               + lines[3:])
        else:
            continue
        if fixed != data:
            mode = path.stat().st_mode
            tmp = path.with_name(path.name + ".relocating")
            tmp.write_bytes(fixed)
            tmp.chmod(mode)
            tmp.replace(path)
    return old


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv")
    moved_from = repair_venv(target)
    if moved_from:
        print(f"{target}: moved from {moved_from}; its scripts now run {target.absolute()}/bin/python")
