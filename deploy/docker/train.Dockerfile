# Training image: torch with CUDA + the train extra (transformers, ONNX export, the bundled base model).
#   docker build -f deploy/docker/train.Dockerfile -t embedforge:train .
#   docker run --gpus all -v "$PWD/data:/data:ro" -v "$PWD/output:/output" embedforge:train \
#       train --train-path /data/train.jsonl --val-path /data/val.jsonl --save-path /output/vector_model
# Several GPUs or machines: the same image under torchrun (docs/scaling.md):
#   docker run --gpus all --network host --entrypoint torchrun ... embedforge:train \
#       --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id job1 \
#       -m embedforge train ...
# torch from PyPI (its Linux wheel brings CUDA as nvidia-* packages) at TORCH_VERSION, everything else at its
# version in requirements.lock, which was resolved against that torch (its CUDA packages are locked too).
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY embedforge ./embedforge
RUN pip install --no-cache-dir -c requirements.lock "torch==${TORCH_VERSION}" ".[train]" \
    && pip check \
    && rm -rf /src
WORKDIR /work
# HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM are set by the `embedforge` entry point itself.
ENV PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --create-home --home-dir /home/embedforge --shell /usr/sbin/nologin embedforge \
    && chown embedforge /work
USER 10001
VOLUME ["/data", "/output"]
# 29400: torchrun's c10d rendezvous (multi-node).
EXPOSE 29400
ENTRYPOINT ["embedforge"]
CMD ["train", "--help"]
