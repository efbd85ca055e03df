# A reproducible Debian 12 image with delafs and everything its tests use.
#   docker build -t delafs .
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN delafs                    # the demo
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN delafs scripts/test.sh    # the tests
# Both mount delafs, so both need the host's FUSE device and CAP_SYS_ADMIN
# (mount(2)).  On a host with AppArmor (Debian, Ubuntu) Docker's docker-default
# profile also denies mount(2): add --security-opt apparmor=unconfined there.
# Both rerun scripts/setup.sh (apt-get update, pip): the container needs network.
FROM debian:12
ENV DEBIAN_FRONTEND=noninteractive PYTHON=python3
WORKDIR /src/delafs
COPY . .
RUN bash scripts/setup.sh && rm -rf /var/lib/apt/lists/*
CMD ["bash", "scripts/demo.sh"]
