"""A B+tree of metadata items in 4 KiB blocks, updated in place under the journal.

Every piece of metadata but the bitmap lives in one tree (btrfs's single
key space): inodes, directory entries, xattrs, extents, symlink targets and
the orphan list are items keyed by ``(objectid, type, offset)``, so the items
of one inode sit together and a range scan reads them in order.

Node layout (after the 32-byte common header; ``aux`` = level | nitems << 8):

  leaf      nitems x (key 17 bytes, value offset u16, value length u16),
            values packed from the end of the block downwards
  internal  nitems x (key 17 bytes, child block u64)

An internal entry's key is a lower bound of every key in its child's
subtree; an insert below a node's first key lowers that key on its way
down, so the bound stays true and separators stay in order.

Changing one item dirties its leaf; a split adds one node per level and a
new root at most; a delete frees empty nodes and merges a node that drops
under a quarter full into a sibling when they fit together.  Values are at
most MAX_VALUE bytes so that any overfull leaf splits into two valid halves.
"""

from __future__ import annotations

import operator
import struct
from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Callable, Protocol

from ..lib.errors import CorruptionError
from ..lib.locks import assert_owned
from ..ondisk import BLOCK_SIZE, HDR_SIZE, MAGIC_NODE, seal, unseal

Key = tuple[int, int, int]

_KEY = struct.Struct("<QBQ")
_LEAF_ENT = struct.Struct("<QBQHH")
_INT_ENT = struct.Struct("<QBQQ")
ITEM_HDR = _LEAF_ENT.size                       # 21
NODE_CAP = BLOCK_SIZE - HDR_SIZE                # 4064 bytes of payload
INT_MAX = NODE_CAP // _INT_ENT.size             # 162 children
MAX_VALUE = 1024
MAX_LEVEL = 16
KEY_MIN: Key = (0, 0, 0)
KEY_MAX: Key = (2**64 - 1, 255, 2**64 - 1)
_M64 = 2**64 - 1

# Structs of n consecutive entries, made on first use (at most a few
# hundred sizes: a leaf holds at most NODE_CAP // (ITEM_HDR + 1) items).
_LEAF_STRUCTS: dict[int, struct.Struct] = {}
_INT_STRUCTS: dict[int, struct.Struct] = {}


def _entries(cache: dict[int, struct.Struct], one: struct.Struct, n: int) -> struct.Struct:
    s = cache.get(n)
    if s is None:
        s = cache[n] = struct.Struct("<" + one.format.lstrip("<") * n)
    return s


def pack_key(k: Key) -> int:
    """A key as one int that orders as the tuple does.  Decoded nodes keep
    their keys packed: a three-int tuple cost 96 bytes a key, the packed int
    40, a third of what a decoded extent leaf holds."""
    return (k[0] << 72) | (k[1] << 64) | k[2]


def unpack_key(p: int) -> Key:
    return p >> 72, (p >> 64) & 0xFF, p & _M64


class Node:
    """A decoded tree node.  ``pkeys`` holds its keys packed (pack_key),
    ``vals`` item values (leaf) or child block numbers (internal);
    ``nbytes`` is the payload in use (leaf)."""

    __slots__ = ("blocknr", "level", "pkeys", "vals", "nbytes")

    def __init__(self, blocknr: int, level: int, keys: list[Key], vals: list):
        self._set(blocknr, level, [pack_key(k) for k in keys], vals)

    @classmethod
    def packed(cls, blocknr: int, level: int, pkeys: list[int], vals: list) -> "Node":
        node = cls.__new__(cls)
        node._set(blocknr, level, pkeys, vals)
        return node

    def _set(self, blocknr: int, level: int, pkeys: list[int], vals: list) -> None:
        self.blocknr = blocknr
        self.level = level
        self.pkeys = pkeys
        self.vals = vals
        self.nbytes = (sum(len(v) for v in vals) + ITEM_HDR * len(pkeys)) if level == 0 \
            else _INT_ENT.size * len(pkeys)

    @property
    def keys(self) -> tuple[Key, ...]:
        """The keys as tuples, for readers outside the tree (a copy: an
        item assignment to it fails instead of changing nothing)."""
        return tuple(unpack_key(k) for k in self.pkeys)

    @property
    def is_leaf(self) -> bool:
        return self.level == 0

    def overfull(self) -> bool:
        return self.nbytes > NODE_CAP

    def encode(self, seq: int) -> bytes:
        # Every commit encodes each dirty node, and item by item (a
        # pack_into and a slice assignment per item) a full leaf took
        # ~150 us: the values go in with one join, the entries with one
        # pack of a struct of n entries.
        buf = bytearray(BLOCK_SIZE)
        pkeys = self.pkeys
        n = len(pkeys)
        flat: list[int] = []
        add = flat.extend
        if self.level == 0:
            vals = self.vals
            lens = [len(v) for v in vals]
            ends = list(accumulate(lens))
            if n:
                buf[BLOCK_SIZE - ends[-1]:] = b"".join(reversed(vals))
            for k, e, ln in zip(pkeys, ends, lens):
                add((k >> 72, (k >> 64) & 0xFF, k & _M64, BLOCK_SIZE - e, ln))
            _entries(_LEAF_STRUCTS, _LEAF_ENT, n).pack_into(buf, HDR_SIZE, *flat)
        else:
            for k, c in zip(pkeys, self.vals):
                add((k >> 72, (k >> 64) & 0xFF, k & _M64, c))
            _entries(_INT_STRUCTS, _INT_ENT, n).pack_into(buf, HDR_SIZE, *flat)
        return seal(buf, MAGIC_NODE, self.blocknr, seq, self.level | n << 8)

    @classmethod
    def decode(cls, buf: bytes, blocknr: int,
               check_item: Callable[[Key, bytes], str | None] | None = None) -> "Node":
        """``check_item`` judges each leaf item's content: a leaf holding
        an item it rejects is as corrupt as one with a bad checksum."""
        # Every metadata-cache miss pays this, so the entries are unpacked
        # in one iter_unpack and the checks run over the lists (a third of
        # the per-item loop's time).
        _, aux = unseal(buf, MAGIC_NODE, blocknr)
        level, n = aux & 0xFF, aux >> 8

        def bad(why):
            raise CorruptionError("btree node", blocknr, why)
        if level > MAX_LEVEL:
            bad(f"level {level}")
        view = memoryview(buf)
        if level == 0:
            dir_end = HDR_SIZE + n * ITEM_HDR
            if dir_end - HDR_SIZE > NODE_CAP:
                bad(f"{n} items do not fit")
            ents = list(_LEAF_ENT.iter_unpack(view[HDR_SIZE:dir_end]))
            spans = [(e[3], e[4]) for e in ents]
            for i, (voff, vlen) in enumerate(spans):
                if voff < dir_end or voff + vlen > BLOCK_SIZE:
                    bad(f"item {i} value out of bounds")
            if not isinstance(buf, bytes):
                buf = bytes(buf)
            keys = [(a << 72) | (b << 64) | c for a, b, c, _, _ in ents]
            vals = [buf[o:o + ln] for o, ln in spans]
        else:
            if n > INT_MAX or n == 0:
                bad(f"{n} entries in an internal node")
            ents = list(_INT_ENT.iter_unpack(view[HDR_SIZE:HDR_SIZE + n * _INT_ENT.size]))
            keys = [(a << 72) | (b << 64) | c for a, b, c, _ in ents]
            vals = [e[3] for e in ents]
        if not all(map(operator.lt, keys, keys[1:])):
            i = next(i for i in range(1, n) if keys[i - 1] >= keys[i])
            bad(f"keys out of order at entry {i}")
        node = cls.packed(blocknr, level, keys, vals)
        if node.nbytes > NODE_CAP:
            bad("items overlap")
        if level == 0 and n > 1:
            # encode() packs values down from the end in key order; anything
            # else (a foreign writer, damage) is checked the slow way.
            if any(o2 + l2 > o1 for (o1, _), (o2, l2) in zip(spans, spans[1:])):
                spans.sort()
                for (o1, l1), (o2, _) in zip(spans, spans[1:]):
                    if o1 + l1 > o2:
                        bad("item values overlap")
        if check_item is not None and level == 0:
            for (a, b, c, _, _), v in zip(ents, vals):
                if why := check_item((a, b, c), v):
                    bad(f"item {(a, b, c)}: {why}")
        return node


class DamagedSubtree(CorruptionError):
    """A node below the root failed to load.  ``resume`` is the first key
    past the subtree it heads (None if nothing follows): a scan that may
    skip damage goes on from there."""

    def __init__(self, err: CorruptionError, resume: Key | None):
        super().__init__(err.structure, err.block, err.detail)
        self.resume = resume


class RootHolder(Protocol):
    """Where the tree's root lives (the fsinfo block)."""
    root_block: int
    root_level: int

    def root_changed(self) -> None: ...


def worst_case_nodes(nitems: int, item_size: int, levels: int) -> int:
    """Upper bound of new nodes that inserting ``nitems`` items of
    ``item_size`` bytes can allocate in a tree of ``levels`` levels (a
    margin of two more levels is added for growth meanwhile)."""
    total = 0
    n = nitems
    per_leaf = max(1, (NODE_CAP // 2) // (ITEM_HDR + item_size))
    for level in range(levels + 2):
        per = per_leaf if level == 0 else INT_MAX // 2
        splits = min(n, -(-n // per) + 1)
        total += splits
        n = splits
    return total + 1


class BTree:
    """Operations on the tree.  A change (insert, update, delete) is part of
    a metadata operation: the caller holds the filesystem's meta_lock for
    the whole call, and it is asserted.  Reads need it only where changes
    can run at the same time (a mounted filesystem); offline tools read a
    tree nothing else touches.  Block allocation and freeing go through the
    two callbacks so the tree knows nothing of the allocator or the bitmap."""

    def __init__(self, store, holder: RootHolder,
                 alloc_node: Callable[[int], int], free_node: Callable[[int], None],
                 check_item: Callable[[Key, bytes], str | None] | None = None):
        self.store = store
        self.holder = holder
        self.alloc_node = alloc_node
        self.free_node = free_node
        # What the tree's user knows of its items' content: a leaf holding an
        # item it rejects is as corrupt as one with a bad checksum.
        self.check_item = check_item

    def _assert_locked(self, what: str) -> None:
        """Changing the tree is part of a metadata operation: the caller
        holds the filesystem's meta_lock (a store without one is a test's)."""
        lock = getattr(self.store, "meta_lock", None)
        if lock is not None:
            assert_owned(lock, f"BTree.{what}")

    async def node(self, blk: int) -> Node:
        return await self.store.get(blk, self._decode)

    def _decode(self, buf: bytes, blk: int) -> Node:
        return Node.decode(buf, blk, self.check_item)

    async def _child(self, path: list[list], d: int) -> Node:
        """The child that ``path[d]`` points at, checked against its parent."""
        parent, i = path[d]
        try:
            child = await self.node(parent.vals[i])
            self._check_bounds(parent, i, child)
        except CorruptionError as e:
            resume = None
            for node, j in reversed(path[:d + 1]):
                if j + 1 < len(node.pkeys):
                    resume = unpack_key(node.pkeys[j + 1])
                    break
            raise DamagedSubtree(e, resume) from None
        return child

    @staticmethod
    def _check_bounds(parent: Node, i: int, child: Node) -> None:
        """A child's keys lie in the range its parent gives it: a key that
        moved out of it would be found by no descent, or by the wrong one."""
        if child.level != parent.level - 1:
            raise CorruptionError("btree node", child.blocknr,
                                  f"level {child.level} under a level {parent.level} node")
        ck, pk = child.pkeys, parent.pkeys
        if ck and (ck[0] < pk[i] or (i + 1 < len(pk) and ck[-1] >= pk[i + 1])):
            raise CorruptionError("btree node", child.blocknr,
                                  f"keys outside the range node {parent.blocknr} gives it")

    @property
    def levels(self) -> int:
        return self.holder.root_level + 1

    # -- descending ---------------------------------------------------------------

    async def _path(self, pk: int, inserting: bool = False) -> list[list]:
        """[[node, index], ...] from the root to the leaf that owns the
        packed key ``pk``."""
        path = []
        node = await self.node(self.holder.root_block)
        while not node.is_leaf:
            i = bisect_right(node.pkeys, pk) - 1
            if i < 0:
                i = 0
                if inserting:
                    node.pkeys[0] = pk
                    self.store.mark_dirty(node)
            path.append([node, i])
            node = await self._child(path, len(path) - 1)
        path.append([node, bisect_left(node.pkeys, pk)])
        return path

    async def lookup(self, key: Key) -> bytes | None:
        pk = pack_key(key)
        leaf, i = (await self._path(pk))[-1]
        if i < len(leaf.pkeys) and leaf.pkeys[i] == pk:
            return leaf.vals[i]
        return None

    async def lookup_item(self, key: Key) -> tuple[bytes, int] | None:
        """(value, leaf block) of ``key``: the block names the leaf in errors."""
        pk = pack_key(key)
        leaf, i = (await self._path(pk))[-1]
        if i < len(leaf.pkeys) and leaf.pkeys[i] == pk:
            return leaf.vals[i], leaf.blocknr
        return None

    async def _step(self, path: list[list], forward: bool, hi: int | None = None) -> bool:
        """Move the path's leaf to its next (or previous) sibling leaf.  Going
        forward, a separator at or past ``hi`` ends the walk without reading
        the next leaf: its keys are all past the range, so a scan never
        touches (nor fails on) a block it does not need."""
        depth = len(path) - 2
        while depth >= 0:
            node, i = path[depth]
            j = i + 1 if forward else i - 1
            if 0 <= j < len(node.pkeys):
                if hi is not None and node.pkeys[j] >= hi:
                    return False
                path[depth][1] = j
                break
            depth -= 1
        else:
            return False
        for d in range(depth + 1, len(path)):
            child = await self._child(path, d - 1)
            path[d] = [child, 0 if forward else len(child.pkeys) - 1]
        if not forward:
            path[-1][1] = len(path[-1][0].pkeys)
        return True

    async def lookup_le(self, key: Key) -> tuple[Key, bytes] | None:
        """The item with the greatest key <= ``key``."""
        pk = pack_key(key)
        path = await self._path(pk)
        leaf, i = path[-1]
        if i < len(leaf.pkeys) and leaf.pkeys[i] == pk:
            return key, leaf.vals[i]
        while i == 0:
            if not await self._step(path, forward=False):
                return None
            leaf, i = path[-1]
        return unpack_key(leaf.pkeys[i - 1]), leaf.vals[i - 1]

    async def scan(self, lo: Key, hi: Key, limit: int | None = None, *,
                   with_block: bool = False,
                   on_damage: Callable[[CorruptionError], None] | None = None) -> list[tuple]:
        """Items with lo <= key < hi, in order, at most ``limit`` of them, as
        (key, value) or, ``with_block``, (key, value, leaf block).

        With ``on_damage``, a subtree that cannot be read is reported to it
        and skipped: the scan returns what can be read (a directory listing
        loses only the entries a damaged leaf held)."""
        out: list[tuple] = []
        while True:
            try:
                await self._scan(lo, hi, limit, with_block, out)
                return out
            except DamagedSubtree as e:
                if on_damage is None:
                    raise
                on_damage(e)
                if e.resume is None or e.resume >= hi:
                    return out
                lo = e.resume

    async def _scan(self, lo: Key, hi: Key, limit: int | None, with_block: bool,
                    out: list[tuple]) -> None:
        phi = pack_key(hi)
        path = await self._path(pack_key(lo))
        while True:
            leaf, i = path[-1]
            keys = leaf.pkeys
            while i < len(keys):
                k = keys[i]
                if k >= phi:
                    return
                key = unpack_key(k)
                out.append((key, leaf.vals[i], leaf.blocknr) if with_block else (key, leaf.vals[i]))
                if limit is not None and len(out) >= limit:
                    return
                i += 1
            if not await self._step(path, forward=True, hi=phi):
                return

    # -- changing -------------------------------------------------------------------

    async def insert(self, key: Key, value: bytes, *, replace: bool = False) -> None:
        self._assert_locked("insert")
        if len(value) > MAX_VALUE:
            raise ValueError(f"btree value of {len(value)} bytes exceeds {MAX_VALUE}")
        pk = pack_key(key)
        path = await self._path(pk, inserting=True)
        leaf, i = path[-1]
        if i < len(leaf.pkeys) and leaf.pkeys[i] == pk:
            if not replace:
                raise KeyError(key)
            leaf.nbytes += len(value) - len(leaf.vals[i])
            leaf.vals[i] = value
        else:
            leaf.pkeys.insert(i, pk)
            leaf.vals.insert(i, value)
            leaf.nbytes += ITEM_HDR + len(value)
        self.store.mark_dirty(leaf)
        if leaf.overfull():
            await self._split(path)

    async def update(self, key: Key, value: bytes) -> None:
        """Replace the value of an existing item."""
        self._assert_locked("update")
        pk = pack_key(key)
        path = await self._path(pk)
        leaf, i = path[-1]
        if not (i < len(leaf.pkeys) and leaf.pkeys[i] == pk):
            raise KeyError(key)
        if len(value) > MAX_VALUE:
            raise ValueError(f"btree value of {len(value)} bytes exceeds {MAX_VALUE}")
        leaf.nbytes += len(value) - len(leaf.vals[i])
        leaf.vals[i] = value
        self.store.mark_dirty(leaf)
        if leaf.overfull():
            await self._split(path)

    async def delete(self, key: Key) -> bool:
        self._assert_locked("delete")
        pk = pack_key(key)
        path = await self._path(pk)
        leaf, i = path[-1]
        if not (i < len(leaf.pkeys) and leaf.pkeys[i] == pk):
            return False
        del leaf.pkeys[i]
        leaf.nbytes -= ITEM_HDR + len(leaf.vals.pop(i))
        self.store.mark_dirty(leaf)
        await self._rebalance(path)
        return True

    def _new_node(self, level: int, pkeys: list[int], vals: list, goal: int) -> Node:
        node = Node.packed(self.alloc_node(goal), level, pkeys, vals)
        self.store.add(node)
        return node

    async def _split(self, path: list[list]) -> None:
        depth = len(path) - 1
        while depth >= 0:
            node = path[depth][0]
            if not node.overfull():
                return
            if node.is_leaf:
                half, acc, mid = node.nbytes // 2, 0, 0
                while acc < half:
                    acc += ITEM_HDR + len(node.vals[mid])
                    mid += 1
                mid = min(max(mid, 1), len(node.pkeys) - 1)
            else:
                mid = len(node.pkeys) // 2
            right = self._new_node(node.level, node.pkeys[mid:], node.vals[mid:], node.blocknr)
            del node.pkeys[mid:]
            del node.vals[mid:]
            node.nbytes -= right.nbytes
            self.store.mark_dirty(node)
            if depth == 0:
                root = self._new_node(node.level + 1, [node.pkeys[0], right.pkeys[0]],
                                      [node.blocknr, right.blocknr], node.blocknr)
                self.holder.root_block = root.blocknr
                self.holder.root_level = root.level
                self.holder.root_changed()
                return
            parent, i = path[depth - 1]
            parent.pkeys.insert(i + 1, right.pkeys[0])
            parent.vals.insert(i + 1, right.blocknr)
            parent.nbytes += _INT_ENT.size
            self.store.mark_dirty(parent)
            depth -= 1

    def _drop(self, node: Node) -> None:
        self.store.forget(node.blocknr)
        self.free_node(node.blocknr)

    async def _rebalance(self, path: list[list]) -> None:
        depth = len(path) - 1
        while depth > 0:
            node = path[depth][0]
            parent, i = path[depth - 1]
            if node.pkeys and node.nbytes >= NODE_CAP // 4:
                return
            if not node.pkeys:
                del parent.pkeys[i]
                del parent.vals[i]
                parent.nbytes -= _INT_ENT.size
                self.store.mark_dirty(parent)
                self._drop(node)
            else:
                # Merge with a sibling when both fit in one node.
                if i + 1 < len(parent.pkeys):
                    left, right, ri = node, await self.node(parent.vals[i + 1]), i + 1
                elif i > 0:
                    left, right, ri = await self.node(parent.vals[i - 1]), node, i
                else:
                    return
                if left.nbytes + right.nbytes > NODE_CAP:
                    return
                left.pkeys.extend(right.pkeys)
                left.vals.extend(right.vals)
                left.nbytes += right.nbytes
                self.store.mark_dirty(left)
                del parent.pkeys[ri]
                del parent.vals[ri]
                parent.nbytes -= _INT_ENT.size
                self.store.mark_dirty(parent)
                self._drop(right)
            depth -= 1
        root = path[0][0]
        if not root.is_leaf and len(root.pkeys) == 1:
            # Collapse a root with a single child, possibly several levels.
            while not root.is_leaf and len(root.pkeys) == 1:
                child = await self.node(root.vals[0])
                self._drop(root)
                root = child
            self.holder.root_block = root.blocknr
            self.holder.root_level = root.level
            self.holder.root_changed()

    # -- whole-tree walks (fsck, statistics) ------------------------------------

    async def walk(self, visit: Callable[[Node, Key, Key], None]) -> None:
        """Visit every node depth-first with the key bounds its parent gives it."""
        stack = [(self.holder.root_block, KEY_MIN, KEY_MAX, self.holder.root_level)]
        while stack:
            blk, lo, hi, level = stack.pop()
            node = await self.node(blk)
            if node.level != level:
                raise CorruptionError("btree node", blk, f"level {node.level}, expected {level}")
            visit(node, lo, hi)
            if not node.is_leaf:
                keys = node.keys
                for j in range(len(keys) - 1, -1, -1):
                    chi = hi if j + 1 == len(keys) else keys[j + 1]
                    stack.append((node.vals[j], keys[j], chi, level - 1))
