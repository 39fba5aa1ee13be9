# The chimera-ray image, used by cluster.yaml (docker.image) and deploy/kuberay/*.yaml.
#   docker build -t YOUR_REGISTRY/chimera-ray:0.1.0 .
#   docker push YOUR_REGISTRY/chimera-ray:0.1.0
# Base: Ray's own GPU image of the Ray version pyproject.toml pins, Python 3.11 (the project needs
# >= 3.11), with the `ray` user, sudo, rsync and ssh that the cluster launcher and KubeRay expect.
# tests/test_deploy.py checks these pins against pyproject.toml and the Makefile.
FROM rayproject/ray:2.60.0-py311-gpu

# Installed as the README installs the project: torch first (the Makefile's TORCH_SPEC), then the
# project with the pinned ranges of pyproject.toml. On Linux x86_64 PyPI's torch wheel is the CUDA
# build (its CUDA libraries come as pip packages; the node's NVIDIA driver must support them);
# pass --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/<cuXYZ>"
# for another CUDA build. Not editable and without the test extras: this is a runtime image.
ARG TORCH_SPEC="torch==2.13.0"

# The code lives where the job commands name it: /home/ray/chimera-ray/jobs/full.py.
WORKDIR /home/ray/chimera-ray
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 chimera_ray ./chimera_ray
COPY --chown=1000:100 jobs ./jobs
RUN pip install --no-cache-dir ${TORCH_SPEC} \
 && pip install --no-cache-dir . \
 && python -c "import chimera_ray, ray, torch; assert ray.__version__ == '2.60.0', ray.__version__"
