"""The corruption fuzzer with step b through the real daemon: each damaged
image is mounted with ``delafs mount``, listed and read with os.* calls by a
reader process (one stuck for more than 10 s is a hang: the daemon is
SIGKILLed and the mount lazily detached), written to, and unmounted with
``delafs umount``; the daemon's log must hold no Python traceback.  The
other steps (fsck -n, fsck -y, the loss bound) are as in
tests/fuzz/test_corruption_fuzz.py, which fuzzes many more images with an
in-process mount.
"""

from fuzz.corrupt import cached_sources, run_fuzz

SEED = 1
FUSE_IMAGES = 12            # about 1.3 s each with two workers


def test_damaged_images_through_the_daemon(tmp_path, tmp_path_factory, mount_base):
    sources_dir = tmp_path_factory.getbasetemp() / "fuzz-sources"
    sources = cached_sources(sources_dir, SEED, mnt_base=mount_base)
    result = run_fuzz(seed=SEED, images=FUSE_IMAGES, fuse=FUSE_IMAGES, sources=sources,
                      workdir=str(tmp_path / "work"), mnt_base=mount_base,
                      sources_dir=str(sources_dir), json_path=str(tmp_path / "fuzz.json"))
    print(result.table())
    bad = result.acceptance_failures()
    assert not bad, "\n".join([result.table(), "", "acceptance: " + "; ".join(bad), "",
                               *result.failures()])
