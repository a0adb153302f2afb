# Serving image for CPUs: onnxruntime + tokenizers + grpcio, no torch (`pip install .[serve]`).
#   docker build -f deploy/docker/serve-cpu.Dockerfile -t embedforge:serve-cpu .
#   docker run -p 50051:50051 -p 9100:9100 -v "$PWD/output/vector_model/export:/models:ro" embedforge:serve-cpu
# The model directory (an `embedforge export` output) is a volume: the image holds no model.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY embedforge ./embedforge
RUN python -m venv /opt/embedforge \
    && /opt/embedforge/bin/pip install --no-cache-dir ".[serve]"

FROM python:3.12-slim
COPY --from=build /opt/embedforge /opt/embedforge
# HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM are set by the `embedforge` entry point itself.
ENV PATH=/opt/embedforge/bin:$PATH \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin embedforge
USER 10001
VOLUME ["/models"]
# 50051: gRPC (Embed, Score, Info, grpc.health.v1, reflection); 9100: Prometheus metrics.
EXPOSE 50051 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["embedforge", "health", "--target", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["embedforge"]
CMD ["serve", "--model-dir", "/models", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9100", "--metrics-host", "0.0.0.0"]
