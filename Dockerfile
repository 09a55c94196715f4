# The images the KubeRay manifests run (cluster/kuberay/*): Ray with CUDA and this repository at
# /app, installed, so every Ray worker imports `pipeline` and the serve/ app.
#   docker build -t llm-pipeline:latest .                               curate, train, quantize
#   docker build -t llm-pipeline-vllm:latest --build-arg VLLM=1 .       the RayService on GPUs
# vLLM pins its own torch and compressed-tensors, which clash with llm-compressor: two images.
FROM rayproject/ray:2.60.0-py311-gpu
ARG VLLM=0
WORKDIR /app
COPY --chown=ray:users . /app
RUN if [ "$VLLM" = 1 ]; then pip install --no-cache-dir -r requirements-vllm.txt && pip install --no-cache-dir --no-deps -e .; \
    else pip install --no-cache-dir -e .; fi
