# inference-core's container image: the gateway (and its simulator) on Debian's Python.
#
#   docker build -t inference-core .
#   docker run -p 8080:8080 -e INFERENCE_BASE_URL=http://vllm:8000/v1 inference-core
#   docker run inference-core simulate --host 0.0.0.0          # the built-in vLLM stand-in
#
# BASE_IMAGE is any Debian bookworm image (a debootstrap minbase bookworm works the same);
# PIP_OPTIONS passes pip what it needs where PyPI is not reachable, e.g.
# --build-arg PIP_OPTIONS="--no-index --find-links /src/build/wheels" for wheels built beforehand.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv binutils \
 && rm -rf /var/lib/apt/lists/*
COPY . /src
ARG PIP_OPTIONS=""
# Dropped: Jinja2 (swagger-ui-bundle's; only its files are served) and psycopg's bundled libpq,
# OpenSSL and Kerberos (the image takes Debian's libpq5, updated with the rest of the system).
RUN python3 -m venv /opt/inference-core \
 && /opt/inference-core/bin/pip install --no-cache-dir --disable-pip-version-check $PIP_OPTIONS /src \
 && /opt/inference-core/bin/pip uninstall -y -q pip setuptools jinja2 markupsafe psycopg-binary \
 && find /opt/inference-core -name '*.map' -delete \
 && find /opt/inference-core -path '*/swagger_ui_bundle/vendor/*' -type f \
      ! -name swagger-ui.css ! -name swagger-ui-bundle.js -delete \
 && find /opt/inference-core -name '*.so' -exec strip --strip-unneeded {} +

FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libpq5 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin inference \
 && install -d -o 10001 -g 10001 /var/lib/inference-core
COPY --from=build /opt/inference-core /opt/inference-core
ENV PATH=/opt/inference-core/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    INFERENCE_HOST=0.0.0.0 \
    INFERENCE_PORT=8080 \
    INFERENCE_DATA_DIR=/var/lib/inference-core \
    TMPDIR=/var/lib/inference-core
# Uploaded files and their records: a volume, writable even when the container runs --read-only
# (uploads are spooled there as they arrive, too).
VOLUME /var/lib/inference-core
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ['INFERENCE_PORT'], timeout=2)"]
# SIGTERM drains: in-flight requests finish within INFERENCE_SHUTDOWN_GRACE, then exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["inference-core"]
