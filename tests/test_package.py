"""The package as a user gets it: a wheel built from a copy of the sources, imported from outside
the repository, carries the data files its API reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys, json
from pathlib import Path
import torch
import qwenlocal
from qwenlocal.weights.random_checkpoint import TINY, write_random_checkpoint
from qwenlocal.generation.tokenizer import Tokenizer

folder = write_random_checkpoint(Path(sys.argv[1]), TINY, dtype=torch.float32)
ids = Tokenizer.from_dir(folder).encode("Hello world")
print(json.dumps({"module": qwenlocal.__file__, "ids": ids, "files": sorted(p.name for p in folder.iterdir())}))
"""


def test_random_checkpoint_from_a_built_wheel(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("qwenlocal", "quant"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir"]
    subprocess.run([*build, "-q", "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("qwenlocal-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(got["module"]).is_relative_to(site)
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "config.json"} <= set(
        got["files"]
    )
    assert got["ids"] == [9707, 1879]  # "Hello", " world" in Qwen's vocabulary


def test_cited_documents_exist():
    """A comment or test that points the reader to a document must point to one in the repository."""
    import re

    folders = ("qwenlocal", "quant", "tests", "bench")
    cited = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for name in re.findall(r"\b([A-Za-z_]+\.md)\b", path.read_text(encoding="utf-8")):
                cited.setdefault(name, path.relative_to(ROOT))

    def exists(name: str) -> bool:
        return (ROOT / name).is_file() or any(next((ROOT / f).rglob(name), None) for f in folders)

    missing = {name: str(where) for name, where in cited.items() if not exists(name)}
    assert not missing, missing


def test_readme_layout_names_every_module():
    """The README's layout section lists each module of qwenlocal/ and quant/ (subpackages too), and no
    others: a folder's modules are indented below it."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed, folders = set(), []  # folders: (indent, name) of the folders the current line is inside
    for line in section.splitlines():
        if not (m := re.match(r"^( *)(\w+/|\w+\.py)(\s|$)", line)):
            continue
        indent, name = len(m.group(1)), m.group(2)
        folders = [(i, f) for i, f in folders if i < indent]
        if name.endswith("/"):
            folders.append((indent, name[:-1]))
        elif folders:
            listed.add("/".join([*(f for _, f in folders), name]))
    modules = {
        p.relative_to(ROOT).as_posix()
        for package in ("qwenlocal", "quant")
        for p in (ROOT / package).rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert listed == modules
