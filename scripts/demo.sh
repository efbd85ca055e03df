#!/usr/bin/env bash
# The main job: set everything up, make an image, fill it with a real tree
# through the Python API, reopen it without a clean close, fsck it and show
# the result.  (Once the FUSE daemon lands, this mounts the image instead.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
work=$(mktemp -d /var/tmp/delafs-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
img="$work/demo.img"
.venv/bin/delafs mkfs "$img" --size 1G
.venv/bin/python tools/populate.py "$img" --tree "$PWD/delafs" --crash
.venv/bin/delafs fsck -n "$img"
.venv/bin/python tools/inspect_image.py "$img"
echo "image: $(du -k "$img" | cut -f1) KiB on disk for $(stat -c %s "$img") bytes"
