"""fsck: verify every invariant that can be checked on disk, repair what can
be repaired safely.

Exit codes are e2fsck's: 0 clean, 1 errors were repaired, 4 errors left
uncorrected, 8 operational error (no usable superblock, I/O error).

Passes:
  0  superblocks (both copies) and the journal (replayed unless -n; with -n
     the committed transactions are overlaid in memory, so the check sees
     what a mount would see without writing anything)
  1  the btree: every node's checksum, magic, level and key bounds; no node
     block used twice or outside the allocatable area
  1b (-y, damaged tree) salvage: the lost key ranges from valid leaves
     anywhere on the device
  2  items: each checked by itself as a reader checks it (ItemContext),
     then extents (no overlap within a file, no block used twice
     anywhere), xattrs, symlinks, directory entries (target exists, d_type
     matches), orphans, WRITTEN extents wholly past EOF (not an error on a
     linked file on the orphan list: a truncate the next mount finishes);
     with -y, inodes lost but with surviving items are made anew
  3  connectivity: every inode reachable from the root or on the orphan
     list, link counts and directory sizes match the entries
  4  space: the bitmap equals the set of referenced blocks, the fsinfo
     counters and the accounting totals add up
  5  (-y, damaged tree) the tree, fsinfo and bitmap rebuilt (rebuild.py)

Repairs (-y): a bad superblock copy or journal slot is rewritten from the
good one; bitmap and counters are rebuilt from the references; link counts
and directory sizes are corrected; entries naming missing inodes are
removed; stale orphan records are removed; WRITTEN extents past EOF are
freed (the truncate that left them is finished); unreachable inodes are linked
into /lost+found.  With the intact tree these go through a mounted
Filesystem, journaled.  A damaged node, an item failing its checks or a
damaged fsinfo block makes -y salvage (the lost key ranges from every valid
leaf on the device), remake inodes whose other items survive, and rebuild
the tree and fsinfo (rebuild.py; docs/damage.md).  Blocks used twice and
overlapping extents within the intact tree are reported, not repaired.
"""

from __future__ import annotations

import errno
import stat
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

from ..lib.errors import CorruptionError, DelafsError, FsError, NotDelafsError
from ..lib.locks import Mutex
from ..log import journal as journal_log
from ..log.metabuf import MetaStore
from ..ondisk import (
    BITS_PER_BITMAP_BLOCK,
    BLOCK_SHIFT,
    MAX_FILE_BLOCKS,
    ROOT_INO,
    FsInfo,
    Superblock,
    crc32c,
    decode_bitmap,
    encode_bitmap,
    fixed_ranges,
)
from . import rebuild
from .btree import INT_MAX, KEY_MAX, KEY_MIN, Node
from .filesystem import Filesystem
from .items import (
    EXT_WRITTEN,
    EXTENT_ITEM_SIZE,
    ORPHAN_OID,
    T_DIRENT,
    T_EXTENT,
    T_INODE,
    T_ORPHAN,
    T_SYMLINK,
    T_XATTR,
    TYPE_NAMES,
    Inode,
    ItemContext,
    OutOfLine,
    decode_dirent,
    decode_extent,
    decode_symlink,
    decode_xattr,
    dirent_range,
    dtype_of,
    encode_dirent,
    name_hash,
)
from .space import set_bits

EXIT_OK = 0
EXIT_FIXED = 1
EXIT_UNCORRECTED = 4
EXIT_OPERATIONAL = 8


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)      # left as they are
    fixed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK


class _Progress:
    def __init__(self, out, enabled: bool):
        self.out = out
        self.enabled = enabled
        self.last = 0.0

    def phase(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.out, flush=True)

    def tick(self, what: str, n: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            tail = f"/{total}" if total else ""
            print(f"  {what}: {n}{tail}", file=self.out, flush=True)


class Checker:
    def __init__(self, dev, *, repair: bool, out=sys.stdout, progress: bool = False):
        self.dev = dev
        self.repair = repair
        self.out = out
        self.progress = _Progress(out, progress)
        self.report = Report()
        # Facts gathered by the passes.
        self.used: bytearray = bytearray()        # one byte per block: 0 free, 1 used
        self.owner: dict[int, str] = {}           # for double-use messages (sparse)
        self.inodes: dict[int, Inode] = {}
        self.entries: dict[int, list] = defaultdict(list)   # dir -> [(key, ino, dtype, name)]
        self.orphans: set[int] = set()
        self.node_count = 0
        self.bad_tree = False
        self.rebuild = False
        self.out_of_line: list[tuple[OutOfLine, str]] = []
        self.pending_fixes: list[str] = []
        self.fix_blocks: dict[int, int] = {}
        self.fix_past_eof: dict[int, list] = {}        # ino -> its extents to drop

    def error(self, msg: str) -> None:
        self.report.errors.append(msg)
        print(f"ERROR: {msg}", file=self.out)

    def fixed(self, msg: str) -> None:
        self.report.fixed.append(msg)
        print(f"FIXED: {msg}", file=self.out)

    def problem(self, msg: str) -> None:
        """A repairable problem: fixed later under -y, an error otherwise.
        With a damaged tree the item-level facts are incomplete, so nothing
        derived from them is repaired (it could destroy what is intact)."""
        if self.repair and (not self.bad_tree or self.rebuild):
            self.pending_fixes.append(msg)
        else:
            self.error(msg)

    # ------------------------------------------------------------------

    async def run(self) -> Report:
        try:
            sb = await self._pass0()
            if sb is None:
                self.report.exit_code = EXIT_OPERATIONAL
                return self.report
            await self._check(sb)
        except NotDelafsError:
            raise           # nothing to check: the caller says why, once
        except (CorruptionError, FsError, OSError, DelafsError) as e:
            self.error(f"cannot continue: {e}")
            self.report.exit_code = EXIT_OPERATIONAL if isinstance(e, OSError) or \
                (isinstance(e, FsError) and e.errno == errno.EIO) else EXIT_UNCORRECTED
            return self.report
        if self.report.errors:
            self.report.exit_code = EXIT_UNCORRECTED
        elif self.report.fixed:
            self.report.exit_code = EXIT_FIXED
        return self.report

    async def _pass0(self) -> Superblock | None:
        self.progress.phase("Pass 0: superblocks and journal")
        dev = self.dev
        await Filesystem.refuse_too_small(dev)
        prim = sec = None
        perr = serr = None
        try:
            prim = Superblock.decode(await dev.read(0, 1), 0, dev.nblocks)
        except DelafsError as e:
            perr = e
        sec_blk = prim.sb2_block if prim else dev.nblocks - 1
        try:
            sec = Superblock.decode(await dev.read(sec_blk, 1), sec_blk, dev.nblocks)
        except DelafsError as e:
            serr = e
        if prim is None and sec is None:
            if isinstance(perr, NotDelafsError) and isinstance(serr, NotDelafsError):
                raise NotDelafsError(f"{dev.path} is not a delafs image (no superblock at block 0 or {sec_blk})")
            else:
                self.error(f"no valid superblock: {perr}; {serr}")
            return None
        good = prim or sec
        if prim is None or sec is None:
            bad_blk = 0 if prim is None else sec_blk
            why = perr if prim is None else serr
            if self.repair and not dev.readonly:
                await dev.write(bad_blk, [good.encode()])
                await dev.flush()
                self.fixed(f"superblock copy at block {bad_blk} rewritten from the good copy ({why})")
            else:
                self.error(f"superblock copy at block {bad_blk}: {why}")
        elif prim.encode() != sec.encode():
            # Both valid but different (a crash between the two writes).
            if self.repair and not dev.readonly:
                await dev.write(sec_blk, [prim.encode()])
                await dev.flush()
                self.report.notes.append("secondary superblock refreshed from the primary")
        self.sb = good
        # Journal.
        can_write = self.repair and not dev.readonly
        try:
            scan = await journal_log.scan(dev, good, look_past_end=True)
        except CorruptionError as e:           # both slots lost
            if not can_write:
                self.error(str(e))
                return None
            await journal_log.reset(dev, good)
            self.fixed(f"{e}: the journal was reset to empty (what it held that was not yet "
                       f"written home is lost)")
            scan = await journal_log.scan(dev, good, look_past_end=True)
        if scan.bad_slots and not can_write:
            # The other slot still works, but one more failure would leave
            # an image that cannot mount: an error, which -y repairs.
            self.error(f"{scan.bad_slots[0]} (the other slot is intact)")
        if scan.corruption is not None and not can_write:
            self.error(f"{scan.corruption} (transactions after it are valid, so this is damage, not a torn write)")
        if scan.txns:
            self.report.notes.append(f"journal: {len(scan.txns)} committed transaction(s) to replay")
        if (scan.txns or scan.corruption) and can_write:
            await journal_log.recover(dev, good, discard_damaged=True)
            self.overlay = {}
            self.report.notes.append("journal replayed")
            if scan.corruption is not None:
                self.fixed(f"{scan.corruption}: replayed the {len(scan.txns)} intact "
                           f"transaction(s) before it and reset the log past the damage")
        else:
            self.overlay = journal_log.replay_images(scan.txns)
        if scan.bad_slots and can_write:
            await self._rewrite_journal_slot(good, scan.bad_slots[0])
        return good

    async def _rewrite_journal_slot(self, sb: Superblock, why: CorruptionError) -> None:
        """Rewrite the damaged journal superblock slot from the good one,
        one generation older, so the good slot stays the current tail (a
        replay above may have rewritten it already: it writes the tail to
        the older slot)."""
        now = await journal_log.scan(self.dev, sb)
        if now.bad_slots:
            blk = sb.journal_start + 1 - now.jsb_slot
            await self.dev.write(blk, [journal_log.encode_jsb(blk, now.jsb_gen - 1, now.tail_pos,
                                                              now.tail_seq, sb.uuid)])
            await self.dev.flush()
        self.fixed(f"journal superblock slot at block {why.block} rewritten ({why.detail})")

    async def _check(self, sb: Superblock) -> None:
        self.store = MetaStore(self.dev, None, Mutex(), cache_blocks=4096, overlay=self.overlay)
        self.ctx = ItemContext(sb.uuid, sb.data_start, sb.sb2_block, MAX_FILE_BLOCKS)
        self.lost: list[tuple[tuple, tuple]] = []       # key ranges of unreadable subtrees
        self.items: list[tuple[tuple, bytes, int]] = []
        self.nodes_read = bytearray(sb.nblocks)
        self.node_claims: list[int] = []                # every block the walk took as a node
        self.info_bad = False
        try:
            info = FsInfo.decode(await self._read(sb.fsinfo_block), sb.fsinfo_block)
        except CorruptionError as e:
            if not self.repair:
                self.error(str(e))
                raise
            # The root is unknown: every key is lost, salvage finds them.
            self.problem(f"{e}: rebuilt from the B+tree leaves found on the device")
            info = FsInfo()
            self.info_bad = True
            self.lost.append((KEY_MIN, KEY_MAX))
            self.bad_tree = True
        self.info = info
        self.used = bytearray(sb.nblocks)
        for start, n in fixed_ranges(sb):
            self.used[start:start + n] = b"\x01" * n
        if not self.info_bad:
            await self._pass1(sb, info)
        # With -y a damaged tree is rebuilt from every item that can be
        # found, so the facts the passes gather are the new tree's.
        self.rebuild = self.repair and self.bad_tree
        if self.rebuild:
            await self._salvage(sb)
        self._pass2(sb)
        self._pass3()
        await self._pass4(sb, info)
        if self.repair and self.pending_fixes:
            if self.rebuild:
                await self._rebuild(sb)
            else:
                await self._apply_repairs()

    async def _read(self, blk: int) -> bytes:
        return self.overlay.get(blk) or await self.dev.read(blk, 1)

    def _claim(self, start: int, n: int, what: str) -> bool:
        sb = self.sb
        if start < sb.data_start or start + n > sb.sb2_block:
            self.error(f"{what} uses blocks {start}..{start + n - 1} outside the allocatable area")
            return False
        seg = self.used[start:start + n]
        if any(seg):
            first = start + next(i for i, b in enumerate(seg) if b)
            other = self.owner.get(first, "fixed metadata" if first < sb.data_start else "another owner")
            self.error(f"block {first} is used twice: by {what} and by {other}")
        self.used[start:start + n] = b"\x01" * n
        self.owner[start] = what
        return True

    # -- pass 1: the tree ------------------------------------------------------

    async def _pass1(self, sb: Superblock, info: FsInfo) -> None:
        self.progress.phase("Pass 1: btree")
        stack = [(info.root_block, KEY_MIN, KEY_MAX, info.root_level, "root")]
        while stack:
            blk, lo, hi, level, parent = stack.pop()
            if not self._claim(blk, 1, f"btree node {blk}"):
                self._lose(lo, hi)
                continue
            self.node_claims.append(blk)
            try:
                node = Node.decode(await self._read(blk), blk)
                keys = node.keys            # a tuple built from the packed keys: once
                if node.level != level:
                    raise CorruptionError("btree node", blk, f"level {node.level}, its parent expects {level}")
                if keys and (keys[0] < lo or keys[-1] >= hi):
                    raise CorruptionError("btree node", blk, "keys outside the bounds its parent gives")
            except CorruptionError as e:
                self._lose(lo, hi)
                self.problem(f"{e} (referenced by {parent})" + (
                    "; its items are salvaged" if self.repair else "; the items below it are lost"))
                continue
            self.nodes_read[blk] = 1
            self.node_count += 1
            self.progress.tick("nodes", self.node_count)
            if node.is_leaf:
                self.items.extend((k, v, blk) for k, v in zip(keys, node.vals))
            else:
                if len(keys) > INT_MAX:
                    self.error(f"btree node at block {blk}: too many entries")
                for j in range(len(keys) - 1, -1, -1):
                    chi = hi if j + 1 == len(keys) else keys[j + 1]
                    stack.append((node.vals[j], keys[j], chi, level - 1, f"node {blk}"))
        self.items.sort(key=lambda t: t[0])

    def _lose(self, lo, hi) -> None:
        """Keys [lo, hi) are under a node that cannot be read: with -y the
        tree is rebuilt, so this and every later problem is repaired."""
        self.lost.append((lo, hi))
        self.bad_tree = True
        self.rebuild = self.repair

    async def _salvage(self, sb: Superblock) -> None:
        """Find the items of the lost key ranges in valid leaves anywhere on
        the device, and drop those whose blocks the intact tree already
        references (a stale copy must never take another file's blocks)."""
        self.progress.phase("Pass 1b: salvaging items of damaged nodes")
        leaves = await rebuild.salvage_leaves(self.dev, sb, self.nodes_read)
        found = rebuild.pick_items(leaves, self.lost, self.ctx.problem)
        refs = bytearray(self.used)
        for key, val, _ in self.items:
            for start, n in _block_refs(key, val):
                refs[start:start + n] = b"\x01" * n
        kept = 0
        for key, val, blk in found:
            runs = _block_refs(key, val)
            if any(any(refs[a:a + n]) for a, n in runs):
                continue
            for a, n in runs:
                refs[a:a + n] = b"\x01" * n
            self.items.append((key, val, blk))
            kept += 1
        self.items.sort(key=lambda t: t[0])
        if kept:
            self.pending_fixes.append(f"salvaged {kept} item(s) of damaged nodes from {len(leaves)} "
                                      f"leaf copies found on the device")

    # -- pass 2: items -------------------------------------------------------------

    def _prefilter(self) -> None:
        """With -y, drop the items that cannot be kept: those failing their
        checks, and those of an inode that is gone (a lost directory's
        entries: its children go to lost+found).  The tree is rebuilt
        without them."""
        if not self.repair:
            return
        good = []
        for key, val, blk in self.items:
            if why := self.ctx.problem(key, val):
                self._drop(f"{_describe(key, blk)}: {why}")
                continue
            good.append((key, val, blk))
        self.items = good
        inodes = {k[0] for k, _, _ in good if k[1] == T_INODE}
        lost = {k[0] for k, _, _ in good if k[0] != ORPHAN_OID} - inodes
        if lost:
            self._remake_inodes(lost)

    def _remake_inodes(self, lost: set[int]) -> None:
        """Items survive whose inode item was lost: make the inode anew
        from them (the type a directory entry names, else what the items
        say: entries make a directory, extents a file), so a damaged leaf
        costs only what it held.  Owner, mode and times are lost with it;
        link counts, sizes and block counts are fixed by the later passes."""
        kinds: dict[int, set[int]] = defaultdict(set)
        ends: dict[int, int] = defaultdict(int)
        named: dict[int, int] = {}
        for key, val, _ in self.items:
            if key[0] in lost:
                kinds[key[0]].add(key[1])
                if key[1] == T_EXTENT:
                    ends[key[0]] = max(ends[key[0]], (key[2] + decode_extent(val)[1]) * 4096)
            if key[1] == T_DIRENT:
                ino, dtype, _ = decode_dirent(val)
                named.setdefault(ino, dtype)
        now = time.time_ns()
        for ino in sorted(lost):
            if ino in named:
                mode = named[ino] << 12
            elif T_DIRENT in kinds[ino]:
                mode = stat.S_IFDIR
            elif T_SYMLINK in kinds[ino]:
                mode = stat.S_IFLNK
            else:
                mode = stat.S_IFREG
            mode |= 0o700 if stat.S_ISDIR(mode) else 0o600
            inode = Inode(ino, mode, nlink=1, size=ends[ino] if stat.S_ISREG(mode) else 0,
                          atime=now, mtime=now, ctime=now, btime=now,
                          parent=ROOT_INO if stat.S_ISDIR(mode) else 0)
            self.items.append(((ino, T_INODE, 0), inode.encode(), 0))
            self.rebuild = True
            self.problem(f"inode {ino} was lost: made anew as {_MODE_NAMES.get(stat.S_IFMT(mode), 'a file')} "
                         f"from its surviving items")
        self.items.sort(key=lambda t: t[0])

    def _drop(self, msg: str) -> None:
        self.rebuild = True
        self.problem(msg + "; dropped")

    def _pass2(self, sb: Superblock) -> None:
        self.progress.phase("Pass 2: inodes, extents, directories, xattrs")
        self._prefilter()
        last_ext: dict[int, int] = {}
        blocks: dict[int, int] = defaultdict(int)
        # ino -> [(key, pblock, length, state)] of its extents wholly past
        # EOF (an inode's item sorts before its extents).
        past_eof: dict[int, list] = defaultdict(list)
        for n, (key, val, blk) in enumerate(self.items):
            self.progress.tick("items", n, len(self.items))
            oid, typ, off = key
            where = f"{TYPE_NAMES.get(typ, f'item type {typ}')} {key} in leaf {blk}"
            if why := self.ctx.problem(key, val):
                self.error(f"{_describe(key, blk)}: {why}")
                continue
            try:
                if typ == T_INODE:
                    self.inodes[oid] = Inode.decode(oid, val, blk)
                elif typ == T_EXTENT:
                    pblock, length, state = decode_extent(val, blk)
                    if off < last_ext.get(oid, 0):
                        self.error(f"{where}: overlaps the previous extent of inode {oid}")
                    last_ext[oid] = off + length
                    if self._claim(pblock, length, f"extent {off}+{length} of inode {oid}"):
                        blocks[oid] += length
                        inode = self.inodes.get(oid)
                        if inode is not None and off << BLOCK_SHIFT >= inode.size:
                            past_eof[oid].append((key, pblock, length, state))
                elif typ == T_XATTR:
                    name, value = decode_xattr(val, blk)
                    if isinstance(value, OutOfLine):
                        if self._claim(value.pblock, value.nblocks, f"xattr {name!r} of inode {oid}"):
                            blocks[oid] += value.nblocks
                            self.out_of_line.append((value, f"xattr {name!r} of inode {oid}"))
                elif typ == T_SYMLINK:
                    target = decode_symlink(val, blk)
                    if isinstance(target, OutOfLine):
                        if self._claim(target.pblock, target.nblocks, f"symlink target of inode {oid}"):
                            blocks[oid] += target.nblocks
                            self.out_of_line.append((target, f"symlink target of inode {oid}"))
                elif typ == T_DIRENT:
                    ino, dtype, name = decode_dirent(val, blk)
                    self.entries[oid].append((key, ino, dtype, name))
                elif typ == T_ORPHAN and oid == ORPHAN_OID:
                    self.orphans.add(off)
            except CorruptionError as e:
                self.error(f"{e} ({where})")
        self._kept, self.items = self.items, []
        for ino, inode in self.inodes.items():
            if inode.blocks != blocks.get(ino, 0):
                self.problem(f"inode {ino}: block count {inode.blocks}, its extents and values hold {blocks.get(ino, 0)}")
                self.fix_blocks[ino] = blocks.get(ino, 0)
        for ino in set(last_ext) | set(self.entries):
            if ino not in self.inodes:
                self.error(f"items of inode {ino} exist but the inode does not")
        self._check_past_eof(past_eof)

    def _check_past_eof(self, past_eof: dict[int, list]) -> None:
        """WRITTEN blocks wholly past EOF are what a shrinking truncate had
        not freed yet: growing the file would read them back, and nothing
        else frees them.  On a listed, linked inode that is a truncate a
        crash cut short, which the next mount finishes; anywhere else it is
        damage, repaired by finishing the truncate.  UNWRITTEN ones alone
        are fallocate KEEP_SIZE, or writeback past the on-disk size whose
        completion a crash cut off: they read as zeros."""
        for ino, exts in past_eof.items():
            written = sum(1 for e in exts if e[3] == EXT_WRITTEN)
            if not written:
                continue
            inode = self.inodes[ino]
            if ino in self.orphans and inode.nlink > 0 and inode.is_reg:
                self.report.notes.append(f"inode {ino}: truncate in progress, the next mount frees "
                                         f"{sum(e[2] for e in exts)} block(s) past EOF")
                continue
            self.problem(f"inode {ino}: {written} WRITTEN extent(s) past EOF ({inode.size} bytes), "
                         f"the first at file block {exts[0][0][2]}")
            self.fix_past_eof[ino] = exts

    # -- pass 3: connectivity and link counts ----------------------------------------

    def _pass3(self) -> None:
        self.progress.phase("Pass 3: connectivity and link counts")
        self.fix_nlink: dict[int, int] = {}
        self.fix_dirsize: dict[int, int] = {}
        self.fix_dangling: list = []
        self.fix_unreachable: list[int] = []
        self.fix_orphans: list[int] = []
        self.links = links = defaultdict(int)
        self.subdirs = subdirs = defaultdict(int)
        parent_of: dict[int, int] = {}
        if ROOT_INO not in self.inodes:
            if not self.rebuild:
                self.error("the root directory (inode 1) is missing")
                return
            self.problem("the root directory (inode 1) is lost: made anew")
            now = time.time_ns()
            self.inodes[ROOT_INO] = Inode(ROOT_INO, stat.S_IFDIR | 0o755, nlink=2, atime=now, mtime=now,
                                          ctime=now, btime=now, parent=ROOT_INO)
            self.fix_nlink[ROOT_INO] = 2
        for d, ents in self.entries.items():
            dinode = self.inodes.get(d)
            if dinode is None:
                continue
            if not dinode.is_dir:
                self.error(f"inode {d} has directory entries but is not a directory")
                continue
            for key, ino, dtype, name in ents:
                target = self.inodes.get(ino)
                if target is None:
                    self.problem(f"entry {name!r} in directory {d} names missing inode {ino}")
                    self.fix_dangling.append((d, key))
                    continue
                if dtype != dtype_of(target.mode):
                    self.error(f"entry {name!r} in directory {d}: type {dtype} but inode {ino} is {dtype_of(target.mode)}")
                links[ino] += 1
                if target.is_dir:
                    subdirs[d] += 1
                    if ino in parent_of:
                        self.error(f"directory {ino} has more than one name")
                    parent_of[ino] = d
        # Reachability from the root.
        reach = {ROOT_INO}
        todo = [ROOT_INO]
        while todo:
            d = todo.pop()
            for _, ino, _, _ in self.entries.get(d, ()):
                if ino in self.inodes and ino not in reach:
                    reach.add(ino)
                    if self.inodes[ino].is_dir:
                        todo.append(ino)
        unreachable: dict[int, int] = {}      # ino -> the link count its entries give
        for ino, inode in self.inodes.items():
            if inode.is_dir:
                expect = 2 + subdirs[ino]
                if ino != ROOT_INO and ino in parent_of and inode.parent != parent_of[ino]:
                    self.error(f"directory {ino}: parent field {inode.parent}, but its entry is in {parent_of[ino]}")
                nents = sum(1 for e in self.entries.get(ino, ()) if e[1] in self.inodes)
                if not self.repair or (self.bad_tree and not self.rebuild):
                    nents = len(self.entries.get(ino, ()))
                if inode.size != nents:
                    self.problem(f"directory {ino}: size {inode.size}, has {nents} entries")
                    self.fix_dirsize[ino] = nents
            else:
                expect = links[ino]
            if ino != ROOT_INO and ino not in reach:
                if ino in self.orphans:
                    continue
                self.problem(f"inode {ino} is not reachable from the root and not on the orphan list")
                unreachable[ino] = expect
                continue
            if inode.nlink != expect:
                self.problem(f"inode {ino}: link count {inode.nlink}, counted {expect}")
                self.fix_nlink[ino] = expect
        # Reattach only the tops of disconnected subtrees: an inode named by
        # an entry of another unreachable directory comes back with it.
        named_inside = {e[1] for d in unreachable for e in self.entries.get(d, ())}
        self.fix_unreachable = sorted(unreachable.keys() - named_inside)
        for ino in unreachable.keys() & named_inside:
            # Comes back with its directory; a name lost elsewhere (the
            # other link of a hard-linked file) still changes its count.
            if self.inodes[ino].nlink != unreachable[ino]:
                self.problem(f"inode {ino}: link count {self.inodes[ino].nlink}, counted {unreachable[ino]}")
                self.fix_nlink[ino] = unreachable[ino]
        for ino in self.orphans:
            inode = self.inodes.get(ino)
            # A linked regular file is listed while a truncate of it runs.
            if inode is None or (inode.nlink != 0 and not inode.is_reg):
                self.problem(f"orphan record for inode {ino}, which is {'missing' if inode is None else 'still linked'}")
                self.fix_orphans.append(ino)

    # -- pass 4: space ------------------------------------------------------------------

    async def _pass4(self, sb: Superblock, info: FsInfo) -> None:
        self.progress.phase("Pass 4: free space")
        for ref, what in self.out_of_line:
            if ref.nblocks != -(-ref.length // 4096) or ref.length == 0:
                self.error(f"{what}: {ref.length} bytes in {ref.nblocks} blocks")
                continue
            buf = await self.dev.read(ref.pblock, ref.nblocks)
            if crc32c(bytes(buf[:ref.length])) != ref.crc:
                self.error(f"{what} at block {ref.pblock}: value checksum mismatch")
        self.bitmap_fix = False
        mismatched = 0
        for i in range(sb.bitmap_blocks):
            blk = sb.bitmap_start + i
            try:
                bits = decode_bitmap(await self._read(blk), blk)
            except CorruptionError as e:
                self.problem(str(e))
                self.bitmap_fix = True
                continue
            base = i * BITS_PER_BITMAP_BLOCK
            n = min(BITS_PER_BITMAP_BLOCK, sb.nblocks - base)
            expect = bytearray(len(bits))
            for j, b in enumerate(self.used[base:base + n]):
                if b:
                    expect[j >> 3] |= 1 << (j & 7)
            set_bits(expect, n, BITS_PER_BITMAP_BLOCK - n, True)
            if expect != bits:
                for j in range(n):
                    a = bits[j >> 3] >> (j & 7) & 1
                    if a != self.used[base + j]:
                        mismatched += 1
                        if mismatched <= 10:
                            state = "marked free but in use" if not a else "marked in use but not referenced"
                            self.problem(f"bitmap: block {base + j} {state}")
                self.bitmap_fix = True
        if mismatched > 10:
            self.problem(f"bitmap: {mismatched - 10} more blocks disagree")
        used = self.counted_used = sum(self.used)
        if self.bad_tree:
            return
        if info.used_blocks != used:
            self.problem(f"fsinfo: used blocks {info.used_blocks}, counted {used}")
            self.bitmap_fix = True
        if info.inode_count != len(self.inodes):
            self.problem(f"fsinfo: inode count {info.inode_count}, counted {len(self.inodes)}")
        if self.inodes and info.next_ino <= max(self.inodes):
            self.error(f"fsinfo: next inode number {info.next_ino} is already in use")
        self.counted_used = used

    # -- repairs ------------------------------------------------------------------------------

    async def _rebuild(self, sb: Superblock) -> None:
        """Write a new tree holding every item kept, with the fixes the
        passes found applied, then the fsinfo naming it and the bitmap of
        what it references.  Crash-safe by ordering: the new nodes go to
        free blocks and the bitmap still marks the old tree until the
        fsinfo block has switched to the new one."""
        self.progress.phase("Pass 5: rebuilding the B+tree")
        items = {k: v for k, v, _ in self._kept}
        for _, key in self.fix_dangling:
            items.pop(key, None)
        for ino in self.fix_orphans:
            items.pop((ORPHAN_OID, T_ORPHAN, ino), None)
        inodes = self.inodes
        for ino, n in self.fix_blocks.items():
            inodes[ino].blocks = n
        for ino, exts in self.fix_past_eof.items():
            for key, pblock, length, _ in exts:
                items.pop(key, None)
                self.used[pblock:pblock + length] = bytes(length)
                inodes[ino].blocks -= length
        next_ino = max(self.info.next_ino, max(inodes) + 1)
        next_gen = max(self.info.next_generation, max(i.generation for i in inodes.values()) + 1)
        if self.fix_unreachable:
            next_ino = self._lost_found_items(items, next_ino, next_gen)
            next_gen += 1
        for ino, n in self.fix_nlink.items():
            inodes[ino].nlink = n
        for ino, n in self.fix_dirsize.items():
            inodes[ino].size = n
        for ino, inode in inodes.items():
            items[(ino, T_INODE, 0)] = inode.encode()
        cursor = [sb.data_start]

        def alloc() -> int:
            b = cursor[0]
            while self.used[b]:
                b += 1
            if b >= sb.sb2_block:
                raise FsError(errno.ENOSPC, "no free blocks left for the rebuilt tree")
            self.used[b] = 1
            cursor[0] = b + 1
            return b

        root, level, nodes = rebuild.build(sorted(items.items()), alloc)
        seq = self.info.next_generation
        for node in nodes:
            await self.dev.write(node.blocknr, [node.encode(seq)])
        await self.dev.flush()
        await self._write_bitmap_blocks()
        for b in self.node_claims:
            self.used[b] = 0
        info = FsInfo(root_block=root, root_level=level, next_ino=next_ino,
                      next_generation=next_gen, used_blocks=sum(self.used),
                      inode_count=len(inodes))
        await self.dev.write(sb.fsinfo_block, [info.encode(sb.fsinfo_block, 0)])
        await self.dev.flush()
        await self._write_bitmap_blocks()
        await self.dev.flush()
        for msg in dict.fromkeys(self.pending_fixes):
            self.fixed(msg)
        self.fixed(f"B+tree rebuilt: {len(items)} items in {len(nodes)} nodes")

    def _lost_found_items(self, items: dict, next_ino: int, gen: int) -> int:
        """Link the tops of disconnected subtrees into /lost+found (made if
        missing) as #INO, in item space.  Returns the next free inode number."""
        inodes = self.inodes
        root = inodes[ROOT_INO]
        lf_ino = next((e[1] for e in self.entries.get(ROOT_INO, ())
                       if e[3] == b"lost+found" and e[1] in inodes and inodes[e[1]].is_dir), None)
        if lf_ino is None:
            lf_ino, next_ino = next_ino, next_ino + 1
            now = time.time_ns()
            inodes[lf_ino] = Inode(lf_ino, stat.S_IFDIR | 0o700, nlink=2, atime=now, mtime=now,
                                   ctime=now, btime=now, generation=gen, parent=ROOT_INO)
            self._add_entry(items, ROOT_INO, b"lost+found", inodes[lf_ino])
            self.fix_nlink[ROOT_INO] = self.fix_nlink.get(ROOT_INO, root.nlink) + 1
            self.fix_dirsize[ROOT_INO] = self.fix_dirsize.get(ROOT_INO, root.size) + 1
        lf = inodes[lf_ino]
        size = self.fix_dirsize.get(lf_ino, lf.size)
        nlink = self.fix_nlink.get(lf_ino, lf.nlink)
        for ino in self.fix_unreachable:
            inode = inodes[ino]
            self._add_entry(items, lf_ino, b"#%d" % ino, inode)
            size += 1
            if inode.is_dir:
                nlink += 1
                inode.parent = lf_ino
                self.fix_nlink[ino] = 2 + self.subdirs[ino]
            else:
                self.fix_nlink[ino] = self.links[ino] + 1
        self.fix_dirsize[lf_ino] = size
        self.fix_nlink[lf_ino] = nlink
        return next_ino

    def _add_entry(self, items: dict, dir_ino: int, name: bytes, inode: Inode) -> None:
        lo, hi = dirent_range(name_hash(name, self.sb.uuid))
        off = next(o for o in range(lo, hi) if (dir_ino, T_DIRENT, o) not in items)
        items[(dir_ino, T_DIRENT, off)] = encode_dirent(inode.ino, dtype_of(inode.mode), name)

    async def _apply_repairs(self) -> None:
        """Repair through a mounted Filesystem so every change is journaled."""
        if self.bitmap_fix and not self.bad_tree:
            # Directly, before the open: a damaged bitmap block would stop
            # the open itself.  The journal is empty here (replayed above).
            await self._write_bitmap()
        fs = await Filesystem.open(self.dev)
        try:
            fs.info.inode_count = len(self.inodes)
            fs.store.mark_dirty(fs.info)
            async with fs.transaction(items=8, pool=True):
                for d, key in self.fix_dangling:
                    await fs.tree.delete(key)
                for ino in self.fix_orphans:
                    await fs.tree.delete((ORPHAN_OID, T_ORPHAN, ino))
                for ino, n in self.fix_blocks.items():
                    inode = await fs.iget(ino)
                    inode.blocks = n
                    await fs.log_inode(inode)
            for ino in self.fix_past_eof:
                # After the block counts above: loading the extent map checks them.
                async with fs.transaction(items=2, item_size=EXTENT_ITEM_SIZE, pool=True):
                    await fs._itruncate_extents(await fs.iget(ino))
            if self.fix_unreachable:
                await self._to_lost_found(fs)
            async with fs.transaction(pool=True):
                for ino, n in self.fix_nlink.items():
                    inode = await fs.iget(ino)
                    inode.nlink = n
                    await fs.log_inode(inode)
                for ino, n in self.fix_dirsize.items():
                    inode = await fs.iget(ino)
                    inode.size = n
                    await fs.log_inode(inode)
                fs.store.mark_dirty(fs.info)
            await fs.close()
        except BaseException:
            fs.shutdown = fs.shutdown or "fsck repair failed"
            raise
        for msg in self.pending_fixes:
            self.fixed(msg)

    async def _to_lost_found(self, fs) -> None:
        try:
            lf = await fs.lookup(ROOT_INO, b"lost+found")
        except FsError:
            lf = await fs.mkdir(ROOT_INO, b"lost+found", 0o700)
        for ino in self.fix_unreachable:
            async with fs.transaction(items=2):
                inode = await fs.iget(ino)
                d = await fs.iget(lf.ino)
                await fs.add_entry(d, b"#%d" % ino, inode)
                if inode.is_dir:
                    d.nlink += 1
                    inode.parent = lf.ino
                    inode.nlink = 2 + self.subdirs[ino]
                else:
                    inode.nlink = self.links[ino] + 1
                await fs.log_inode(inode)
                await fs.log_inode(d)
            self.fix_nlink.pop(ino, None)

    async def _write_bitmap(self) -> None:
        """Make the bitmap and fsinfo.used_blocks equal the references."""
        await self._write_bitmap_blocks()
        self.info.used_blocks = self.counted_used
        await self.dev.write(self.sb.fsinfo_block, [self.info.encode(self.sb.fsinfo_block, 0)])
        await self.dev.flush()

    async def _write_bitmap_blocks(self) -> None:
        sb = self.sb
        for i in range(sb.bitmap_blocks):
            base = i * BITS_PER_BITMAP_BLOCK
            n = min(BITS_PER_BITMAP_BLOCK, sb.nblocks - base)
            bits = bytearray((BITS_PER_BITMAP_BLOCK + 7) // 8)
            for j, b in enumerate(self.used[base:base + n]):
                if b:
                    bits[j >> 3] |= 1 << (j & 7)
            set_bits(bits, n, BITS_PER_BITMAP_BLOCK - n, True)
            await self.dev.write(sb.bitmap_start + i, [encode_bitmap(bits, sb.bitmap_start + i, 0)])


_MODE_NAMES = {stat.S_IFDIR: "a directory", stat.S_IFREG: "a regular file", stat.S_IFLNK: "a symlink"}


def _describe(key: tuple, blk: int) -> str:
    return f"corrupt {TYPE_NAMES.get(key[1], f'type {key[1]}')} record {key} in the leaf at block {blk}"


def _block_refs(key: tuple, val: bytes) -> list[tuple[int, int]]:
    """The (start, length) block runs an item references."""
    typ = key[1]
    if typ == T_EXTENT:
        pblock, length, _ = decode_extent(val)
        return [(pblock, length)]
    ref = decode_xattr(val)[1] if typ == T_XATTR else decode_symlink(val) if typ == T_SYMLINK else None
    return [(ref.pblock, ref.nblocks)] if isinstance(ref, OutOfLine) else []


async def check(dev, *, repair: bool, out=sys.stdout, progress: bool = False) -> Report:
    """Check (and with ``repair`` fix) the image on ``dev``.  Raises
    NotDelafsError, changing nothing, when it carries no delafs at all."""
    return await Checker(dev, repair=repair, out=out, progress=progress).run()


def summary(report: Report, sb: Superblock | None = None) -> str:
    if report.exit_code == EXIT_OK:
        return "clean"
    if report.exit_code == EXIT_FIXED:
        return f"{len(report.fixed)} problem(s) repaired"
    if report.exit_code == EXIT_UNCORRECTED:
        return f"{len(report.errors)} error(s) left uncorrected"
    return "operational error: " + (report.errors[-1] if report.errors else "see above")
