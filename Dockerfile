# A reproducible Debian 12 image with delafs and everything its tests use.
#   docker build -t delafs .
#   docker run --rm delafs                      # the demo (scripts/demo.sh)
#   docker run --rm delafs scripts/test.sh      # the test suite
# Mounting (once the FUSE daemon lands) needs: --device /dev/fuse --cap-add SYS_ADMIN
FROM debian:12
ENV DEBIAN_FRONTEND=noninteractive PYTHON=python3
WORKDIR /src/delafs
COPY . .
RUN bash scripts/setup.sh && rm -rf /var/lib/apt/lists/*
CMD ["bash", "scripts/demo.sh"]
