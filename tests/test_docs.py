"""Every command written in README.md and docs/ still parses: its script exists, each --option
it uses is one the script's --help lists, and Config-based scripts accept the values too (a line
that starts with `git checkout COMMIT &&` runs at that commit and is not checked)."""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_SCRIPTS = {"train_safe.py", "test.py", "ablation.py", "detect_live.py", "baselines.py", "meta_eval.py"}


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `python SCRIPT ...` / `python -m chaos.inject ...` in a code block,
    with continuation lines joined and `&&` chains split."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S) + re.findall(r"\n    (python .*?)\n", text):
            block = re.sub(r"\\\n\s*", " ", block)
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith("git checkout"):
                    continue  # a command of an earlier commit (docs/decisions.md): today's --help does not hold it
                for part in line.split("&&"):
                    part = part.strip()
                    if not part.startswith("python ") or part.startswith("python -c") or "[" in part or "..." in part:
                        continue  # not a script call, or a synopsis with optional parts
                    argv = shlex.split(part)[1:]
                    if argv[0] != "-m" or argv[:2] == ["-m", "chaos.inject"]:
                        found.append((f"{doc.name}: {part}", argv))
    return found


@functools.lru_cache(maxsize=None)
def help_options(script: tuple[str, ...]) -> set[str]:
    out = subprocess.run([sys.executable, *script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"--([a-z][a-z0-9_-]*)", out.stdout))


COMMANDS = documented_commands()


def test_docs_hold_commands():
    assert len(COMMANDS) >= 20, [c for c, _ in COMMANDS]


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_documented_command_parses(where, argv):
    script = tuple(argv[:2]) if argv[0] == "-m" else (argv[0],)
    rest = argv[len(script):]
    if script[0] != "-m":
        assert (ROOT / script[0]).is_file(), f"{where}: no such script"
    known = help_options(script)
    used = [a[2:].split("=", 1)[0] for a in rest if a.startswith("--")]
    unknown = [u for u in used if u not in known and not (u.startswith("no-") and u[3:] in known)]
    assert not unknown, f"{where}: options not in {script[-1]} --help: {unknown}"
    if script[0] in CONFIG_SCRIPTS:
        import importlib

        import config
        module = importlib.import_module(script[0][:-3])
        config.parse_cli(rest, extra=getattr(module, "add_options", None))  # values in range too
