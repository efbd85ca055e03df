"""The B+tree against a dict model, over an in-memory block store that
re-decodes every node from its encoded image (so encode/decode is exercised
on every access, as after a cache eviction)."""

import random

import pytest

from delafs.fs.btree import KEY_MAX, KEY_MIN, MAX_VALUE, NODE_CAP, BTree, Node
from delafs.lib.errors import CorruptionError


class ImageStore:
    """Keeps only encoded images, so every get() decodes afresh."""

    def __init__(self):
        self.images = {}
        self.live = {}

    async def get(self, blk, decode):
        obj = self.live.get(blk)
        if obj is None:
            obj = decode(self.images[blk], blk)
            self.live[blk] = obj
        return obj

    def add(self, obj):
        self.live[obj.blocknr] = obj

    def mark_dirty(self, obj):
        self.live[obj.blocknr] = obj

    def forget(self, blk):
        self.live.pop(blk, None)
        self.images.pop(blk, None)

    def flush(self):
        """Encode everything and drop the decoded objects."""
        for blk, obj in self.live.items():
            self.images[blk] = obj.encode(1)
        self.live = {}


class Holder:
    def __init__(self):
        self.root_block = 0
        self.root_level = 0
        self.changes = 0

    def root_changed(self):
        self.changes += 1


def make_tree():
    store = ImageStore()
    holder = Holder()
    nxt = iter(range(100, 10**6))
    freed = []
    tree = BTree(store, holder, lambda goal: next(nxt), freed.append)
    root = Node(next(nxt), 0, [], [])
    store.add(root)
    holder.root_block = root.blocknr
    return tree, store, holder, freed


async def check_tree(tree, model):
    items = await tree.scan(KEY_MIN, KEY_MAX)
    assert items == sorted(model.items())
    seen = set()

    def visit(node, lo, hi):
        assert node.blocknr not in seen
        seen.add(node.blocknr)
        assert node.nbytes <= NODE_CAP
        for k in node.keys:
            assert lo <= k < hi, (lo, k, hi)
    await tree.walk(visit)
    return seen


@pytest.mark.parametrize("seed", range(4))
async def test_random_ops_match_model(seed):
    rng = random.Random(seed)
    tree, store, holder, freed = make_tree()
    model = {}
    for step in range(4000):
        op = rng.random()
        key = (rng.randrange(50), rng.randrange(3), rng.randrange(2000))
        if op < 0.55:
            val = bytes([step % 256]) * rng.choice([0, 8, 30, 200, MAX_VALUE])
            if key in model:
                with pytest.raises(KeyError):
                    await tree.insert(key, val)
                await tree.insert(key, val, replace=True)
            else:
                await tree.insert(key, val)
            model[key] = val
        elif op < 0.9:
            # delete an existing key most of the time
            if model and rng.random() < 0.9:
                key = rng.choice(list(model))
            assert await tree.delete(key) == (key in model)
            model.pop(key, None)
        else:
            assert await tree.lookup(key) == model.get(key)
            le = await tree.lookup_le(key)
            smaller = [k for k in model if k <= key]
            assert le == ((max(smaller), model[max(smaller)]) if smaller else None)
        if step % 500 == 0:
            store.flush()
            await check_tree(tree, model)
    store.flush()
    nodes = await check_tree(tree, model)
    # Every node ever allocated is either in the tree or was freed.
    assert not (nodes & set(freed))
    assert holder.root_level >= 1


async def test_delete_everything_collapses_to_leaf_root():
    tree, store, holder, freed = make_tree()
    keys = [(i, 1, 0) for i in range(3000)]
    for k in keys:
        await tree.insert(k, b"x" * 40)
    assert holder.root_level >= 1
    random.Random(1).shuffle(keys)
    for k in keys:
        assert await tree.delete(k)
    assert holder.root_level == 0
    assert await tree.scan(KEY_MIN, KEY_MAX) == []


async def test_scan_limit_and_bounds():
    tree, *_ = make_tree()
    for i in range(1000):
        await tree.insert((7, 2, i), b"v%d" % i)
    got = await tree.scan((7, 2, 100), (7, 2, 200))
    assert [k[2] for k, _ in got] == list(range(100, 200))
    got = await tree.scan((7, 2, 990), KEY_MAX, limit=3)
    assert [k[2] for k, _ in got] == [990, 991, 992]


def test_value_too_large_is_refused():
    import trio
    tree, *_ = make_tree()
    with pytest.raises(ValueError):
        trio.run(tree.insert, (1, 1, 1), b"x" * (MAX_VALUE + 1))


def test_decode_detects_damage():
    node = Node(55, 0, [(1, 1, 1), (2, 1, 1)], [b"abc", b"def"])
    img = bytearray(node.encode(3))
    assert Node.decode(bytes(img), 55).vals == [b"abc", b"def"]
    with pytest.raises(CorruptionError, match="block 56.*misdirected"):
        Node.decode(bytes(img), 56)
    img[100] ^= 1
    with pytest.raises(CorruptionError, match="btree node at block 55: checksum"):
        Node.decode(bytes(img), 55)


def test_node_images_keep_the_documented_layout():
    """A node's image, built here from the layout in btree.py's docstring
    with struct alone: entries after the header, leaf values packed from
    the end of the block downwards in item order.  Guards encode's fast
    path against drifting from the format images already on disk hold."""
    import struct

    from delafs.ondisk import BLOCK_SIZE, HDR_SIZE, MAGIC_NODE, seal
    rng = random.Random(5)
    for level, n in ((0, 0), (0, 1), (0, 37), (0, NODE_CAP // (21 + 60)), (1, 1), (3, 162)):
        keys = sorted({(rng.randrange(1 << 64), rng.randrange(256), rng.randrange(1 << 64))
                       for _ in range(n)})
        if level == 0:
            vals = [rng.randbytes(rng.randrange(1, 61)) for _ in keys]
        else:
            vals = [rng.randrange(1 << 64) for _ in keys]
        want = bytearray(BLOCK_SIZE)
        off, end = HDR_SIZE, BLOCK_SIZE
        for k, v in zip(keys, vals):
            if level == 0:
                end -= len(v)
                want[end:end + len(v)] = v
                struct.pack_into("<QBQHH", want, off, *k, end, len(v))
                off += 21
            else:
                struct.pack_into("<QBQQ", want, off, *k, v)
                off += 25
        want = seal(want, MAGIC_NODE, 4242, 9, level | len(keys) << 8)
        node = Node(4242, level, keys, vals)
        assert node.encode(9) == want, (level, n)
        back = Node.decode(want, 4242)
        assert (back.level, back.keys, back.vals) == (level, tuple(keys), vals)


def test_the_metadata_cache_full_of_extent_leaves_stays_within_its_budget():
    # The decoded cache must leave room for the page cache and the extent
    # maps (issue 11: RSS <= cache_size + 150 MiB with a million extents);
    # 8192 decoded leaves were about 175 MiB.
    import tracemalloc

    from delafs.fs.btree import ITEM_HDR
    from delafs.fs.items import encode_extent
    from delafs.log.metabuf import CACHE_BLOCKS

    n = NODE_CAP // (ITEM_HDR + len(encode_extent(1, 1, 3)))
    image = Node(7, 0, [(10**6, 3, 10**7 + 2 * i) for i in range(n)],
                 [encode_extent(10**9 + i, 1, 3) for i in range(n)]).encode(1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        leaves = [Node.decode(image, 7) for _ in range(200)]   # freelists serve only the first few
        per_leaf = (tracemalloc.get_traced_memory()[0] - before) / len(leaves)
    finally:
        tracemalloc.stop()
    # Keys kept as (objectid, type, offset) tuples made a full extent leaf
    # 18.7 KiB, 37 MiB for the cache; packed into one int each, 12 KiB.
    assert CACHE_BLOCKS * per_leaf <= 28 << 20, f"{CACHE_BLOCKS} x {per_leaf:.0f} B"
    # Dirty blocks stay decoded beside the clean ones until they commit:
    # rolling only at an eighth of a 128 MiB log allowed 4096 more.
    from delafs.log.metabuf import DIRTY_ROLL
    assert DIRTY_ROLL * per_leaf <= 12 << 20, f"{DIRTY_ROLL} x {per_leaf:.0f} B"


def test_packed_keys_order_as_the_tuples_and_round_trip_through_a_node():
    from delafs.fs.btree import pack_key, unpack_key
    from delafs.fs.items import encode_extent

    edges = [KEY_MIN, KEY_MAX, (0, 0, 2**64 - 1), (0, 1, 0), (1, 0, 0), (2**64 - 1, 0, 0),
             (2**64 - 2, 255, 2**64 - 1)]
    rnd = random.Random(5)
    keys = edges + [(rnd.getrandbits(rnd.choice((8, 40, 64))), rnd.getrandbits(8),
                     rnd.getrandbits(rnd.choice((8, 40, 64)))) for _ in range(2000)]
    assert sorted(keys) == sorted(keys, key=pack_key)
    assert all(unpack_key(pack_key(k)) == k for k in keys)

    keys = [(10**6 + i // 50, 3, 10**7 + i) for i in range(100)]
    leaf = Node.decode(Node(7, 0, keys, [encode_extent(10**9 + i, 1, 3) for i in range(100)]).encode(1), 7)
    internal = Node.decode(Node(8, 1, keys, list(range(10**8, 10**8 + 100))).encode(1), 8)
    for node in (leaf, internal):
        assert list(node.keys) == keys
        with pytest.raises(TypeError):          # a copy: changing it must not pass silently
            node.keys[0] = (1, 1, 1)


def _leaf_image(entries, values_at, n=None, level=0):
    """A sealed node image with the given directory entries (key, offset,
    length) and value bytes placed at offsets: checksums valid, so only
    decode's structural checks can refuse it."""
    import struct

    from delafs.ondisk import BLOCK_SIZE, HDR_SIZE, MAGIC_NODE, seal

    buf = bytearray(BLOCK_SIZE)
    off = HDR_SIZE
    for (a, b, c), voff, vlen in entries:
        struct.pack_into("<QBQHH", buf, off, a, b, c, voff, vlen)
        off += 21
    for voff, data in values_at:
        buf[voff:voff + len(data)] = data
    n = len(entries) if n is None else n
    return seal(buf, MAGIC_NODE, 9, 1, level | n << 8)


@pytest.mark.parametrize("case, why", [
    ("order", "keys out of order"),
    ("bounds", "value out of bounds"),
    ("overlap", "item values overlap"),
    ("count", "items do not fit"),
])
def test_decode_refuses_each_kind_of_damaged_leaf(case, why):
    good = [((5, 1, 10), 4000, 8), ((5, 1, 11), 3992, 8), ((5, 1, 12), 3984, 8)]
    vals = [(4000, b"a" * 8), (3992, b"b" * 8), (3984, b"c" * 8)]
    node = Node.decode(_leaf_image(good, vals), 9)
    assert list(node.keys) == [(5, 1, 10), (5, 1, 11), (5, 1, 12)]
    assert node.vals == [b"a" * 8, b"b" * 8, b"c" * 8] and all(type(v) is bytes for v in node.vals)
    bad = list(good)
    n = None
    if case == "order":
        bad[1], bad[2] = (bad[2][0], 3992, 8), (bad[1][0], 3984, 8)
    elif case == "bounds":
        bad[2] = (bad[2][0], 40, 8)                 # inside the item directory
    elif case == "overlap":
        bad[2] = (bad[2][0], 3996, 8)               # runs into the first value
    elif case == "count":
        n = 4064 // 21 + 1
    with pytest.raises(CorruptionError, match=why):
        Node.decode(_leaf_image(bad, vals, n), 9)
