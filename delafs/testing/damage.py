"""Find and damage metadata blocks of an unmounted image, for the tests of
damaged images (tests/unit/test_fsck_corruption.py, tests/mounted/
test_damaged.py, the corruption fuzzer).

Every function opens the image itself and leaves it closed: the image must
not be mounted.  The tree walks assume a cleanly closed image (all metadata
checkpointed home, the journal empty).
"""

from __future__ import annotations

from typing import Callable

from ..block import BlockDevice
from ..fs.btree import Node
from ..ondisk import MAGIC_NODE, FsInfo, Superblock, unseal


def read_sb(path: str) -> Superblock:
    with BlockDevice.open(path, readonly=True) as dev:
        return Superblock.decode(dev.read_sync(0, 1), 0, dev.nblocks)


def tree_nodes(path: str) -> list[Node]:
    """Every node of the btree, the root first, depth first."""
    with BlockDevice.open(path, readonly=True) as dev:
        sb = Superblock.decode(dev.read_sync(0, 1), 0, dev.nblocks)
        info = FsInfo.decode(dev.read_sync(sb.fsinfo_block, 1), sb.fsinfo_block)
        out = []
        stack = [info.root_block]
        while stack:
            blk = stack.pop()
            node = Node.decode(dev.read_sync(blk, 1), blk)
            out.append(node)
            if not node.is_leaf:
                stack.extend(reversed(node.vals))
        return out


def tree_leaves(path: str) -> list[Node]:
    """The leaves in key order."""
    return [n for n in tree_nodes(path) if n.is_leaf]


def leaf_holding(path: str, key) -> Node:
    """The leaf that holds ``key``."""
    for leaf in tree_leaves(path):
        if key in leaf.keys:
            return leaf
    raise KeyError(key)


def flip(path: str, blk: int, offset: int, mask: int = 0x5A) -> None:
    """XOR one byte of block ``blk`` (a bit-rot / stray-write model)."""
    with BlockDevice.open(path) as dev:
        buf = bytearray(dev.read_sync(blk, 1))
        buf[offset] ^= mask
        dev.write_sync(blk, [buf])
        dev.flush_sync()


def zero_block(path: str, blk: int) -> None:
    with BlockDevice.open(path) as dev:
        dev.write_sync(blk, [bytes(4096)])
        dev.flush_sync()


def reseal_node(path: str, blk: int, edit: Callable[[Node], None]) -> None:
    """Change a node's entries and write it back with a VALID checksum: the
    damage a software bug does, which only checks of the content can see."""
    with BlockDevice.open(path) as dev:
        buf = dev.read_sync(blk, 1)
        seq = unseal(buf, MAGIC_NODE, blk)[0]
        node = Node.decode(buf, blk)
        edit(node)
        dev.write_sync(blk, [node.encode(seq)])
        dev.flush_sync()
