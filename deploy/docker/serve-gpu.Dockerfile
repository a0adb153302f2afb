# Serving image for NVIDIA GPUs: onnxruntime-gpu (CUDA 12 + cuDNN 9) on a CUDA runtime base, no torch.
#   docker build -f deploy/docker/serve-gpu.Dockerfile -t embedforge:serve-gpu .
#   docker run --gpus 1 -p 50051:50051 -p 9100:9100 -v "$PWD/export:/models:ro" embedforge:serve-gpu
# `--provider auto` picks CUDA when the runtime finds a GPU and serves fp16 if the export has it.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# DL3008: the distribution's python3 is the one that matches the base image; no pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY embedforge ./embedforge
# Every package at its version in requirements.lock. The serve extra brings the CPU onnxruntime;
# onnxruntime-gpu (the gpu extra, locked too) replaces it: both install the same module.
RUN python3 -m venv /opt/embedforge \
    && /opt/embedforge/bin/pip install --no-cache-dir -c requirements.lock ".[serve]" \
    && /opt/embedforge/bin/pip uninstall --yes onnxruntime \
    && /opt/embedforge/bin/pip install --no-cache-dir -c requirements.lock onnxruntime-gpu \
    && /opt/embedforge/bin/pip check \
    && rm -rf /src
WORKDIR /
# HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM are set by the `embedforge` entry point itself.
ENV PATH=/opt/embedforge/bin:$PATH \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin embedforge
USER 10001
VOLUME ["/models"]
EXPOSE 50051 9100
# The check below speaks plaintext, as the default CMD serves. With TLS on (serve --tls-cert, --tls-key and,
# for mutual TLS, --tls-client-ca) it must speak TLS too: mount the certificates and hand them to
# `embedforge health` through its environment (the same check then uses them), e.g.
#   docker run -v "$PWD/tls:/tls:ro" -e EMBEDFORGE_TLS_ROOT_CERT=/tls/ca.crt -e EMBEDFORGE_TLS_CERT=/tls/tls.crt \
#       -e EMBEDFORGE_TLS_KEY=/tls/tls.key ... embedforge:serve-gpu serve ... --tls-cert /tls/tls.crt --tls-key /tls/tls.key \
#       --tls-client-ca /tls/ca.crt
# or replace the check, with `docker run --health-cmd 'embedforge health --target 127.0.0.1:50051 --timeout 3
# --tls-root-cert /tls/ca.crt --tls-cert /tls/tls.crt --tls-key /tls/tls.key'` or a HEALTHCHECK in a derived
# image. The check dials 127.0.0.1: the server certificate must name it (subjectAltName IP:127.0.0.1), and
# with mutual TLS the client certificate (here the server's own) needs extendedKeyUsage clientAuth as well.
# Kubernetes ignores HEALTHCHECK: deploy/k8s runs the same command as exec probes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["embedforge", "health", "--target", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["embedforge"]
CMD ["serve", "--model-dir", "/models", "--provider", "cuda", "--host", "0.0.0.0", "--port", "50051", \
     "--metrics-port", "9100", "--metrics-host", "0.0.0.0"]
