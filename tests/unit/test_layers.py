"""The layer rule, enforced: every import between delafs's packages follows
an edge of LAYERS, and test machinery stays out of the runtime.

Each folder of ``delafs/`` is a layer (``ondisk`` is the one top-level
module: the on-disk format every layer that touches the image agrees on).
Every module is parsed, imports inside functions included; an import of
another layer must be an edge below, and an import inside a function must
be one LAZY lists with its reason (an import under ``if TYPE_CHECKING:``
never runs, so it counts as one inside a function).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import delafs

PKG = Path(delafs.__file__).parent

# layer -> the layers (or "layer.module"s) it may import.  Top calls down.
LAYERS: dict[str, set[str]] = {
    "lib": set(),
    "ondisk": {"lib"},
    "block": {"lib"},
    "log": {"lib", "ondisk"},
    "mm": {"lib"},
    "iomap": {"lib", "mm"},
    # The filesystem implements the iomap ops: it needs their types, and
    # its writeback_range queues what it mapped with iomap_add_to_ioend.
    "fs": {"lib", "ondisk", "log", "iomap.types", "iomap.ioend"},
    "vfs": {"lib", "fs", "iomap", "mm"},
    # The adapter calls the filesystem's inode operations (lookup, create,
    # rename, xattrs) as the kernel's VFS calls i_op, data through vfs; the
    # daemon opens the device.
    "fuse": {"lib", "ondisk", "block", "fs", "vfs"},
    "cli": {"lib", "ondisk", "block", "fs", "fuse"},
    "testing": {"lib", "ondisk", "block", "log", "mm", "iomap", "fs", "vfs"},
}

# (importing layer or "layer.module", imported layer or "layer.module") ->
# why it is imported inside a function.  Every import it names must be.
_ENGINE = ("the commands that only talk to a running daemon (stat, sync, umount, bmap, ...) "
           "start without trio, pyfuse3 and the engine: only those that open or mount an image load them")
LAZY: dict[tuple[str, str], str] = {
    ("cli", "testing"): "the race explorer is test machinery: only `delafs race` loads it",
    ("cli", "ondisk"): _ENGINE,
    ("cli", "block"): _ENGINE,
    ("cli", "fs"): _ENGINE,
    ("cli", "fuse.daemon"): _ENGINE,
    ("fuse.control", "block.logwrites"): "fuse/control.py is also the CLI's client, and the block package loads trio",
}


def _under(module: str, key: str) -> bool:
    return module == f"delafs.{key}" or module.startswith(f"delafs.{key}.")


def lazy_reason(importer: str, target: str) -> str | None:
    """LAZY's reason for module ``importer`` importing module ``target``
    inside a function."""
    for (src, edge), why in LAZY.items():
        if _under(importer, src) and _under(target, edge):
            return why
    return None


def layer_of(module: str) -> str:
    """'delafs.fs.btree' -> 'fs'; 'delafs.ondisk' -> 'ondisk'."""
    parts = module.split(".")
    assert parts[0] == "delafs", module
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path):
    """(imported module, line, inside a function) for every delafs import."""
    mod = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
    typing_only = [n for n in ast.walk(tree) if isinstance(n, ast.If)
                   and ast.unparse(n.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")]
    inside |= {id(n) for f in typing_only for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("delafs"):
                continue
            for alias in node.names:
                # "from ..lib import units" imports the module delafs.lib.units
                sub = root.parent / f"{target}.{alias.name}".replace(".", "/")
                is_module = sub.with_suffix(".py").exists() or sub.is_dir()
                yield (f"{target}.{alias.name}" if is_module else target), node.lineno, id(node) in inside
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("delafs"):
                    yield alias.name, node.lineno, id(node) in inside


def allowed(src: str, target: str) -> bool:
    dst = layer_of(target)
    if dst in ("", src):
        return True
    rest = target.split(".")
    return any(edge == dst or edge == ".".join(rest[1:1 + edge.count(".") + 1])
               for edge in LAYERS[src])


def violations(root: Path = PKG) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        src = layer_of(importer)
        if src == "":
            continue                    # delafs/__init__.py
        if src not in LAYERS:
            bad.append(f"{path.relative_to(root.parent)}: layer {src!r} is not in LAYERS")
            continue
        for target, line, lazy in imports(path, root):
            where = f"{path.relative_to(root.parent)}:{line}"
            dst = layer_of(target)
            why = lazy_reason(importer, target)
            if lazy and dst != src and why is None:
                bad.append(f"{where}: {target} imported inside a function (not in LAZY)")
            if why is not None:
                if not lazy:
                    bad.append(f"{where}: {target} must be imported lazily ({why})")
                continue
            if not allowed(src, target):
                bad.append(f"{where}: layer {src} may not import {target} "
                           f"(allowed: {', '.join(sorted(LAYERS[src])) or 'nothing'})")
    return bad


def test_every_import_follows_the_layer_table():
    assert violations() == []


def test_a_wrong_import_is_caught(tmp_path):
    """The rule is not vacuous: an upward import in a copy of the package
    (iomap reaching into the filesystem) and a function-level import of
    another layer are both reported."""
    import shutil
    copy = tmp_path / "delafs"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "iomap" / "writeback.py", "a") as f:
        f.write("\nfrom ..fs.filesystem import Filesystem  # noqa\n"
                "\ndef _late():\n    from ..vfs import mount  # noqa\n")
    bad = violations(copy)
    assert any("layer iomap may not import delafs.fs.filesystem" in b for b in bad), bad
    assert any("delafs.vfs.mount imported inside a function" in b for b in bad), bad


@pytest.mark.parametrize("argv", [["--help"], ["mount", "--help"], ["mkfs", "--help"]])
def test_the_cli_does_not_load_test_machinery(argv):
    """Only ``delafs race`` may load delafs.testing (the race explorer and
    crash simulation); --help, mkfs and mount must not pay for it."""
    code = ("import sys\nfrom delafs.cli import app\ntry:\n    app.main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('delafs.testing', 'delafs.block.memory'))))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_the_race_command_does_load_it():
    code = ("import sys\nfrom delafs.cli import app\napp.main(['race', '--list-mutants'])\n"
            "print('delafs.testing.race' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "True"
