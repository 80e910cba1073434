# nemotron: NeMo's `megatron_gpt_eval.py server=True` for Nemotron-4, in NVIDIA's PyTorch container.
#
#   docker build -t nemotron:0.1.0 .
#   docker run --gpus all -p 1424:1424 nemotron:0.1.0                    # the embedded demo model on port 1424
#   docker run --gpus all --ipc=host -p 1424:1424 -v /models/Minitron-8B:/model:ro nemotron:0.1.0 \
#       gpt_model_file=/model server=True port=1424 trainer.precision=bf16
#   docker run --gpus all --ipc=host -p 1424:1424 -v /models/m:/model:ro --entrypoint torchrun nemotron:0.1.0 \
#       --nproc-per-node 8 -m nemotron.eval gpt_model_file=/model server=True port=1424 \
#       tensor_model_parallel_size=8 trainer.devices=8 trainer.precision=bf16     # one process per GPU
#   enroot import -o nemotron.sqsh dockerd://nemotron:0.1.0             # for Slurm + pyxis: IMAGE=nemotron.sqsh
# Add -v nemotron-triton:/home/nemotron/.triton to `docker run` so a restart reuses the compiled decode kernels: the
# server's warm-up then takes seconds instead of half a minute or more (README, warm_up).
#
# Base image: nvcr.io/nvidia/pytorch:26.04-py3 (Ubuntu 24.04, Python 3.12, NCCL, and NVIDIA's CUDA build of torch
# 2.12.0a0+0291f960b6.nv26.04, as public logs of that image report; it was not pulled here).
# - We run on the image's torch and NCCL and never reinstall torch: the install step fails if pip changes it.
# - The project needs torch >= 2.11, and pip compares NVIDIA's pre-release versions strictly: 2.11.0a0 (the 26.02
#   image) is *older* than 2.11, so with it pip would download a PyPI torch over NVIDIA's, or, with torch pinned,
#   refuse to install. A 2.12.0a0 build satisfies ">=2.11" (both checked here with stand-in torch distributions of
#   those versions). Later images (26.07: torch 2.13.0a0) move to newer CUDA and need newer drivers.
# Nothing here was built: this machine has no Docker engine. The file is linted with hadolint (.ci/lint-dockerfile.sh).
FROM nvcr.io/nvidia/pytorch:26.04-py3

LABEL org.opencontainers.image.title="nemotron" \
      org.opencontainers.image.description="NeMo megatron_gpt_eval.py server=True for Nemotron-4 (PUT /generate on port 1424)" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# PIP_CONSTRAINT (kept in the image, so a later `pip install` cannot replace torch either) replaces the image's own
# /etc/pip/constraint.txt, which pins every preinstalled package and would reject megatron-core's or lightning's
# newer minimums. Ours pins torch and numpy at the versions in the image (numpy because compiled packages in the image
# were built against it) and our direct dependencies at the versions the project is tested with.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CONSTRAINT=/opt/nemotron/constraints.txt

# The build context is filtered by .dockerignore: pyproject.toml, README.md, nemotron/ and the two scripts.
COPY . /tmp/nemotron-src

RUN mkdir -p /opt/nemotron \
    && python -c "import importlib.metadata as m; print('\n'.join(f'{d}=={m.version(d)}' for d in ('torch', 'numpy')))" \
        > /opt/nemotron/constraints.txt \
    && printf '%s\n' megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1 pytorch-lightning==2.6.6 \
        flask==3.1.3 waitress==3.0.2 >> /opt/nemotron/constraints.txt \
    && torch_before="$(python -c 'import torch; print(torch.__version__)')" \
    && python -m pip install --no-cache-dir /tmp/nemotron-src \
    && torch_after="$(python -c 'import torch; print(torch.__version__)')" \
    && if [ "$torch_after" != "$torch_before" ]; then \
           echo "pip replaced the image's torch $torch_before with $torch_after" >&2; exit 1; \
       fi \
    && python -c "import hydra, flask, waitress, sentencepiece, safetensors, lightning_fabric, nemotron.eval" \
    && mkdir -p /opt/nemotron/scripts \
    && cp /tmp/nemotron-src/scripts/call_server.py /tmp/nemotron-src/scripts/nemo_inference.sh /opt/nemotron/scripts/ \
    && chmod 0755 /opt/nemotron/scripts/call_server.py /opt/nemotron/scripts/nemo_inference.sh \
    && rm -rf /tmp/nemotron-src

# pyxis/enroot run tasks as the submitting user anyway; under Docker the server needs no root either.
RUN groupadd --gid 10001 nemotron \
    && useradd --uid 10001 --gid 10001 --create-home --no-log-init --shell /bin/bash nemotron
USER 10001:10001
WORKDIR /home/nemotron

EXPOSE 1424
ENTRYPOINT ["python", "-m", "nemotron.eval"]
CMD ["server=True", "port=1424"]
