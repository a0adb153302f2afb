# Serving image for CPUs: onnxruntime + tokenizers + grpcio, no torch (`pip install .[serve]`).
#   docker build -f deploy/docker/serve-cpu.Dockerfile -t embedforge:serve-cpu .
#   docker run -p 50051:50051 -p 9100:9100 -v "$PWD/output/vector_model/export:/models:ro" embedforge:serve-cpu
# The model directory (an `embedforge export` output) is a volume: the image holds no model.
# Python 3.11, as requirements.lock was resolved with; every package at its locked version, then `pip check`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY embedforge ./embedforge
RUN python -m venv /opt/embedforge \
    && /opt/embedforge/bin/pip install --no-cache-dir -c requirements.lock ".[serve]" \
    && /opt/embedforge/bin/pip check

FROM python:3.11-slim
COPY --from=build /opt/embedforge /opt/embedforge
# HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM are set by the `embedforge` entry point itself.
ENV PATH=/opt/embedforge/bin:$PATH \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin embedforge
USER 10001
VOLUME ["/models"]
# 50051: gRPC (Embed, Score, Info, grpc.health.v1, reflection); 9100: Prometheus metrics.
EXPOSE 50051 9100
# The check below speaks plaintext, as the default CMD serves. With TLS on (serve --tls-cert, --tls-key and,
# for mutual TLS, --tls-client-ca) it must speak TLS too: mount the certificates and hand them to
# `embedforge health` through its environment (the same check then uses them), e.g.
#   docker run -v "$PWD/tls:/tls:ro" -e EMBEDFORGE_TLS_ROOT_CERT=/tls/ca.crt -e EMBEDFORGE_TLS_CERT=/tls/tls.crt \
#       -e EMBEDFORGE_TLS_KEY=/tls/tls.key ... embedforge:serve-cpu serve ... --tls-cert /tls/tls.crt --tls-key /tls/tls.key \
#       --tls-client-ca /tls/ca.crt
# or replace the check, with `docker run --health-cmd 'embedforge health --target 127.0.0.1:50051 --timeout 3
# --tls-root-cert /tls/ca.crt --tls-cert /tls/tls.crt --tls-key /tls/tls.key'` or a HEALTHCHECK in a derived
# image. The check dials 127.0.0.1: the server certificate must name it (subjectAltName IP:127.0.0.1), and
# with mutual TLS the client certificate (here the server's own) needs extendedKeyUsage clientAuth as well.
# Kubernetes ignores HEALTHCHECK: deploy/k8s runs the same command as exec probes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["embedforge", "health", "--target", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["embedforge"]
CMD ["serve", "--model-dir", "/models", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9100", "--metrics-host", "0.0.0.0"]
