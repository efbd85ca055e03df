#!/usr/bin/env python3
"""Copy a real directory tree into a delafs image through the library API,
then verify it: the storage layers' end-to-end check before FUSE.

    tools/populate.py IMAGE --tree DIR [--crash] [--verify-only]

Regular files, directories, symlinks, hard links, xattrs (user.*), modes and
times are copied.  With --crash the filesystem is abandoned after the final
commit without a clean unmount (the image stays marked dirty, the journal
holds the tail) and reopened, so the verification runs on what recovery
rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
import time

import trio

from delafs.block import BlockDevice
from delafs.fs.filesystem import Filesystem
from delafs.ondisk import ROOT_INO

CHUNK = 1 << 20


async def copy_tree(fs: Filesystem, src: str) -> dict[str, int]:
    counts = {"files": 0, "dirs": 0, "symlinks": 0, "links": 0, "bytes": 0, "xattrs": 0}
    seen: dict[tuple[int, int], int] = {}
    dirs = {src: ROOT_INO}
    for top, subdirs, files in os.walk(src):
        dino = dirs[top]
        for name in sorted(subdirs):
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                files.append(name)
                continue
            d = await fs.mkdir(dino, os.fsencode(name), st.st_mode, st.st_uid, st.st_gid)
            dirs[path] = d.ino
            counts["dirs"] += 1
        subdirs[:] = [n for n in subdirs if os.path.join(top, n) in dirs]
        for name in sorted(files):
            path = os.path.join(top, name)
            bname = os.fsencode(name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                await fs.symlink(dino, bname, os.fsencode(os.readlink(path)), st.st_uid, st.st_gid)
                counts["symlinks"] += 1
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in seen:
                await fs.link(seen[key], dino, bname)
                counts["links"] += 1
                continue
            inode = await fs.create(dino, bname, st.st_mode, st.st_uid, st.st_gid)
            seen[key] = inode.ino
            with open(path, "rb") as f:
                off = 0
                while chunk := f.read(CHUNK):
                    await fs.pwrite(inode.ino, off, chunk)
                    off += len(chunk)
            counts["bytes"] += st.st_size
            for attr in _xattrs(path):
                await fs.setxattr(inode.ino, os.fsencode(attr), os.getxattr(path, attr))
                counts["xattrs"] += 1
            await fs.setattr(inode.ino, atime=st.st_atime_ns, mtime=st.st_mtime_ns)
            counts["files"] += 1
    return counts


def _xattrs(path: str) -> list[str]:
    try:
        return [a for a in os.listxattr(path) if a.startswith("user.")]
    except OSError:
        return []


async def lookup_path(fs: Filesystem, rel: str) -> int:
    ino = ROOT_INO
    for part in rel.split(os.sep):
        if part and part != ".":
            ino = (await fs.lookup(ino, os.fsencode(part))).ino
    return ino


async def verify_tree(fs: Filesystem, src: str) -> int:
    """Compare every file, link and directory with the source; return the
    number of mismatches (each is printed)."""
    bad = 0
    for top, subdirs, files in os.walk(src):
        rel_top = os.path.relpath(top, src)
        dino = await lookup_path(fs, rel_top)
        names = {e[0] for e in await fs.readdir(dino, 0, 1 << 20)}
        expected = {os.fsencode(n) for n in subdirs + files
                    if stat.S_ISREG(os.lstat(os.path.join(top, n)).st_mode)
                    or stat.S_ISDIR(os.lstat(os.path.join(top, n)).st_mode)
                    or stat.S_ISLNK(os.lstat(os.path.join(top, n)).st_mode)}
        if names != expected:
            print(f"MISMATCH {rel_top}: entries differ: {sorted(names ^ expected)[:5]}")
            bad += 1
        for name in files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                continue
            inode = await fs.lookup(dino, os.fsencode(name))
            if stat.S_ISLNK(st.st_mode):
                if await fs.readlink(inode.ino) != os.fsencode(os.readlink(path)):
                    print(f"MISMATCH {path}: symlink target")
                    bad += 1
                continue
            with open(path, "rb") as f:
                want = hashlib.sha256(f.read()).digest()
            got = hashlib.sha256(await fs.pread(inode.ino, 0, inode.size + 1)).digest()
            if got != want or inode.size != st.st_size:
                print(f"MISMATCH {path}: content")
                bad += 1
            for attr in _xattrs(path):
                if await fs.getxattr(inode.ino, os.fsencode(attr)) != os.getxattr(path, attr):
                    print(f"MISMATCH {path}: xattr {attr}")
                    bad += 1
    return bad


async def main_async(args) -> int:
    src = os.path.abspath(args.tree)
    if not args.verify_only:
        with BlockDevice.open(args.image) as dev:
            dev.lock()
            fs = await Filesystem.open(dev)
            t0 = time.monotonic()
            counts = await copy_tree(fs, src)
            await fs.commit()
            dt = time.monotonic() - t0
            print(f"copied {counts['files']} files, {counts['dirs']} dirs, {counts['symlinks']} symlinks, "
                  f"{counts['links']} hard links, {counts['xattrs']} xattrs, "
                  f"{counts['bytes'] / 2**20:.1f} MiB in {dt:.1f}s")
            if args.crash:
                print("dropping all in-memory state without a clean unmount (simulated crash)")
            else:
                await fs.close()
    with BlockDevice.open(args.image) as dev:
        dev.lock()
        fs = await Filesystem.open(dev)
        bad = await verify_tree(fs, src)
        await fs.close()
    print("verify: " + ("every file, link and directory matches the source" if not bad
                        else f"{bad} mismatches"))
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", help="a delafs image (made with delafs mkfs)")
    p.add_argument("--tree", required=True, help="directory to copy in and verify against")
    p.add_argument("--crash", action="store_true",
                   help="skip the clean unmount after copying; verify after journal recovery")
    p.add_argument("--verify-only", action="store_true", help="only compare the image with --tree")
    args = p.parse_args()
    return trio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
