#!/usr/bin/env bash
# The main job: set everything up, make an image, mount it, run real
# programs on it, show the engine's counters, unmount, fsck, remount and
# check that everything is still there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
DELAFS="$PWD/.venv/bin/delafs"
PY="$PWD/.venv/bin/python"
work=$(mktemp -d /var/tmp/delafs-demo.XXXXXX)
img="$work/demo.img"
mnt="$work/mnt"
mkdir -p "$mnt"
cleanup() {
    if mountpoint -q "$mnt"; then "$DELAFS" umount "$mnt" || fusermount3 -u -z "$mnt" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== mkfs and mount"
"$DELAFS" mkfs "$img" --size 1G
"$DELAFS" mount "$img" "$mnt"
findmnt "$mnt"

echo "== copy a source tree in, compile and run it there"
cp -a delafs "$mnt/src"
diff -r delafs "$mnt/src" && echo "cp -a + diff -r: identical"
"$PY" -m compileall -q "$mnt/src" && echo "python -m compileall: ok"
(cd "$mnt" && "$PY" -c 'import sys; sys.path.insert(0, "src/.."); import src.ondisk as o; print("imported from the mount: format v%d, block %d" % (o.FORMAT_VERSION, o.BLOCK_SIZE))')

echo "== git and sqlite on the mount"
(cd "$mnt" && git init -q repo && cp -a src repo/ && cd repo && git add -A &&
 git -c user.email=demo@delafs -c user.name=demo commit -qm "demo" && git fsck --no-progress && git log --oneline)
sqlite3 "$mnt/demo.db" "create table t(i, s); begin; $(for i in $(seq 1 1000); do printf "insert into t values(%d,'row %d');" "$i" "$i"; done) commit; pragma integrity_check; select count(*) from t;"

echo "== engine counters (delafs stat)"
"$DELAFS" stat "$mnt"

echo "== unmount, fsck, remount, verify"
"$DELAFS" umount "$mnt"
"$DELAFS" fsck -n "$img"
"$DELAFS" mount "$img" "$mnt" -o dirty_expire=60   # written data stays delalloc until fsync
diff -r delafs "$mnt/src" -x __pycache__ && echo "after remount: source tree identical"
sqlite3 "$mnt/demo.db" "pragma integrity_check; select count(*) from t;"
(cd "$mnt/repo" && git fsck --no-progress && echo "git fsck: ok")

echo "== watch delalloc become written (delafs trace, bmap, top)"
"$DELAFS" trace "$mnt" --json > "$work/trace.json" &
tracer=$!
sleep 1
head -c 300000 /dev/urandom > "$mnt/watched"
"$DELAFS" bmap "$mnt/watched"
"$PY" -c 'import os, sys; os.fsync(os.open(sys.argv[1], os.O_RDWR))' "$mnt/watched"
"$DELAFS" bmap "$mnt/watched"
"$DELAFS" top "$mnt" --file "$mnt/watched" --files 0 -n 1 | tail -5
sleep 0.5
kill "$tracer"; wait "$tracer"
"$PY" - "$work/trace.json" <<'PY'
import collections, json, sys
events = [json.loads(line) for line in open(sys.argv[1])]
print("trace --json:", len(events), "events;",
      ", ".join(f"{k} {v}" for k, v in collections.Counter(e["event"] for e in events).most_common()))
PY
"$DELAFS" umount "$mnt"
"$DELAFS" fsck "$img"
echo "image: $(du -k "$img" | cut -f1) KiB on disk for $(stat -c %s "$img") bytes"
