"""Rebuilding the B+tree from salvaged items: what fsck -y does when nodes
are lost (xfs_repair's phases 3-6, e2fsck's pass 1 salvage, in spirit).

Two pieces, both offline (the image is not mounted):

* :func:`salvage_leaves` reads every allocatable block and keeps the valid
  leaves of this filesystem that the tree walk did not reach: the leaves
  under a damaged internal node are intact, and a leaf's older copy (freed
  by a split or merge, not yet reused) may still hold items of a damaged
  one.  For each key the copy written last (highest journal sequence)
  wins; a newer leaf's key range supersedes what older ones said inside
  it, so an item deleted since does not come back from a stale copy.
* :func:`build` packs the final, sorted items into new leaves and
  internal nodes three quarters full, in free blocks only, so the old tree
  stays intact until the fsinfo block names the new root.
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..lib.errors import CorruptionError
from ..ondisk import MAGIC_NODE, Superblock, peek_magic, unseal
from .btree import _INT_ENT, INT_MAX, ITEM_HDR, NODE_CAP, Key, Node

CHUNK = 256                 # blocks per read while scanning the device
LEAF_FILL = NODE_CAP * 3 // 4
INT_FILL = INT_MAX * 3 // 4


async def salvage_leaves(dev, sb: Superblock, skip: bytearray) -> list[tuple[int, Node]]:
    """(seq, leaf) for every valid leaf in the data area whose block is not
    marked in ``skip`` (the nodes the walk already read), newest first."""
    found = []
    blk = sb.data_start
    while blk < sb.sb2_block:
        n = min(CHUNK, sb.sb2_block - blk)
        buf = await dev.read(blk, n)
        for i in range(n):
            b = blk + i
            if skip[b]:
                continue
            img = bytes(buf[i * 4096:(i + 1) * 4096])
            if peek_magic(img) != MAGIC_NODE:
                continue
            try:
                seq, _ = unseal(img, MAGIC_NODE, b)
                node = Node.decode(img, b)
            except CorruptionError:
                continue
            if node.is_leaf and node.keys:
                found.append((seq, node))
        blk += n
    found.sort(key=lambda t: -t[0])
    return found


def pick_items(leaves: list[tuple[int, Node]], lost: list[tuple[Key, Key]],
               check: Callable[[Key, bytes], str | None]) -> list[tuple[Key, bytes, int]]:
    """The items of ``leaves`` (newest first) that fall in a lost key range,
    passing ``check``; a key range a newer leaf covered is closed to older
    ones."""
    covered: list[tuple[Key, Key]] = []       # [first, last] of leaves taken
    taken: dict[Key, tuple[bytes, int]] = {}

    def in_ranges(k: Key, ranges) -> bool:
        return any(lo <= k < hi for lo, hi in ranges)

    for _, leaf in leaves:
        leaf_keys = leaf.keys
        if not any(in_ranges(k, lost) for k in leaf_keys):
            continue
        for k, v in zip(leaf_keys, leaf.vals):
            if k in taken or not in_ranges(k, lost):
                continue
            if any(lo <= k <= hi for lo, hi in covered):
                continue
            if check(k, v) is None:
                taken[k] = (v, leaf.blocknr)
        covered.append((leaf_keys[0], leaf_keys[-1]))
    return [(k, v, b) for k, (v, b) in sorted(taken.items())]


def build(items: Iterable[tuple[Key, bytes]], alloc: Callable[[], int]) -> tuple[int, int, list[Node]]:
    """New nodes holding ``items`` (sorted by key): (root block, root
    level, every node).  ``alloc`` hands out free blocks."""
    leaves: list[Node] = []
    keys: list = []
    vals: list = []
    size = 0
    for k, v in items:
        if keys and size + ITEM_HDR + len(v) > LEAF_FILL:
            leaves.append(Node(alloc(), 0, keys, vals))
            keys, vals, size = [], [], 0
        keys.append(k)
        vals.append(v)
        size += ITEM_HDR + len(v)
    leaves.append(Node(alloc(), 0, keys, vals))
    nodes = list(leaves)
    level = leaves
    height = 0
    while len(level) > 1:
        height += 1
        up = []
        for i in range(0, len(level), INT_FILL):
            group = level[i:i + INT_FILL]
            up.append(Node(alloc(), height, [c.keys[0] for c in group], [c.blocknr for c in group]))
        nodes.extend(up)
        level = up
    root = level[0]
    # An internal entry's key is a lower bound of its subtree: the first
    # child of each node may start anywhere at or above its parent's key.
    assert all(n.nbytes <= NODE_CAP for n in nodes)
    assert _INT_ENT.size * INT_FILL <= NODE_CAP
    return root.blocknr, root.level, nodes
