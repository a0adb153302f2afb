# Training image: torch with CUDA + the train extra (transformers, ONNX export, the bundled base model).
#   docker build -f deploy/docker/train.Dockerfile -t embedforge:train .
#   docker run --gpus all -v "$PWD/data:/data:ro" -v "$PWD/output:/output" embedforge:train \
#       train --train-path /data/train.jsonl --val-path /data/val.jsonl --save-path /output/vector_model
# Several GPUs or machines: the same image under torchrun (README, "Scaling out"):
#   docker run --gpus all --network host --entrypoint torchrun ... embedforge:train \
#       --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id job1 \
#       -m embedforge train ...
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
WORKDIR /src
COPY pyproject.toml README.md ./
COPY embedforge ./embedforge
# torch comes with the base image (the train extra's torch range is already satisfied). DL3013: this
# installs the project itself; its dependencies are pinned to ranges in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[train]" \
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
