"""The corruption fuzzer (tests/fuzz/corrupt.py) at CI size and on demand.

Both assert issue 10's acceptance on damaged images made from real mounts:
no hang, no traceback, no wrong data, no loss beyond a damaged leaf, fsck -y
converging on at least 95 % of the images and naming what it could not save
on the rest.  Step b runs in-process here (fast); tests/mounted/
test_damage_fuzz.py runs it through the real daemon.

Building the source images needs a real mount (root, /dev/fuse,
fusermount3); without one these tests are skipped with the reason.  A
failure message lists every failing image with the command that replays it
(the source images are kept in pytest's basetemp for that).
"""

import pytest

from .corrupt import cached_sources, run_fuzz, why_not_mountable

SEED = 1
# 0.2-0.45 s of wall clock per image with two workers on a 2-core machine
# (measured with fsck -y's salvage and rebuild, idle and under load), plus
# ~6 s for the source images: 30-60 s of the default suite.
CI_IMAGES = 120
ON_DEMAND_IMAGES = 10_000


@pytest.fixture(scope="session")
def fuzz_sources(tmp_path_factory):
    why = why_not_mountable()
    if why:
        pytest.skip(f"the fuzzer's source images need a real mount: {why}")
    base = tmp_path_factory.getbasetemp() / "fuzz-sources"
    return str(base), cached_sources(base, SEED, mnt_base=str(tmp_path_factory.mktemp("fuzz-mnt")))


def _fuzz(fuzz_sources, tmp_path, images: int) -> None:
    sources_dir, sources = fuzz_sources
    result = run_fuzz(seed=SEED, images=images, sources=sources, workdir=str(tmp_path / "work"),
                      sources_dir=sources_dir, json_path=str(tmp_path / "fuzz.json"))
    print(result.table())
    bad = result.acceptance_failures()
    assert not bad, "\n".join([result.table(), "", "acceptance: " + "; ".join(bad), "",
                               *result.failures()[:40]])


def test_damaged_images(fuzz_sources, tmp_path):
    _fuzz(fuzz_sources, tmp_path, CI_IMAGES)


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)
def test_damaged_images_on_demand(fuzz_sources, tmp_path):
    _fuzz(fuzz_sources, tmp_path, ON_DEMAND_IMAGES)
