# syntax=docker/dockerfile:1
# Production image of the DMFT activity service: CPU torch, shipped bundles, non-root.
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY model ./model
COPY app ./app
# The CPU wheel of torch keeps the image at a fraction of the CUDA build's size.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && /opt/venv/bin/pip install ".[torch]"

FROM python:3.11-slim-bookworm

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/dmft-metrics
RUN useradd --create-home --uid 10001 dmft
COPY --from=build /opt/venv /opt/venv
USER 10001
WORKDIR /home/dmft
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["dmft", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
