#!/usr/bin/env python3
"""Print what a delafs image holds: geometry, journal state, space, tree shape.

    tools/inspect_image.py IMAGE [--json]

Read-only: committed journal transactions are applied in memory only.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from delafs.block import BlockDevice
from delafs.fs.btree import Node
from delafs.fs.filesystem import Filesystem
from delafs.fs.items import TYPE_NAMES
from delafs.log import journal as journal_log


async def inspect(path: str) -> dict:
    with BlockDevice.open(path, readonly=True) as dev:
        sb, problems = await Filesystem.read_superblock(dev)
        scan = await journal_log.scan(dev, sb)
        fs = await Filesystem.open(dev, readonly=True)
        levels: dict[int, int] = {}
        items: dict[str, int] = {}

        def visit(node: Node, lo, hi) -> None:
            levels[node.level] = levels.get(node.level, 0) + 1
            if node.is_leaf:
                for k in node.keys:
                    name = TYPE_NAMES.get(k[1], str(k[1]))
                    items[name] = items.get(name, 0) + 1
        await fs.tree.walk(visit)
        a = fs.space.alloc
        return {
            "image": path,
            "uuid": sb.uuid.hex(),
            "state": "clean" if sb.state == 1 else "dirty (mounted or crashed)",
            "blocks": sb.nblocks,
            "layout": {"journal": [sb.journal_start, sb.journal_blocks],
                       "bitmap": [sb.bitmap_start, sb.bitmap_blocks],
                       "fsinfo": sb.fsinfo_block, "data_start": sb.data_start},
            "journal": {"log_blocks": sb.log_blocks, "tail": scan.tail_pos,
                        "pending_transactions": len(scan.txns), "end": scan.end_reason},
            "space": {"total": a.total, "used": a.used, "free": a.free_blocks,
                      "available": a.available, "free_extents": len(list(a.free_extents()))},
            "inodes": fs.info.inode_count,
            "next_ino": fs.info.next_ino,
            "tree": {"levels": fs.info.root_level + 1,
                     "nodes_per_level": dict(sorted(levels.items())), "items": items},
            "problems": [str(p) for p in problems],
        }


def main() -> int:
    p = argparse.ArgumentParser(description="Show the contents of a delafs image (read-only).")
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args()
    info = trio.run(inspect, args.image)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, val in info.items():
        if isinstance(val, dict):
            print(f"{key}:")
            for k, v in val.items():
                print(f"  {k:24} {v}")
        else:
            print(f"{key:26} {val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
