"""chimera-ray: ChimeraLoRA synthetic training sets, on one laptop or across a Ray cluster.

Per class, a Stable Diffusion UNet gets a multi-head LoRA (one shared A for the class,
one B head per real image); each synthetic image uses ``B' = sum_i w_i B_i`` with a
fresh ``w ~ Dirichlet(alpha)``. See README.md and shared METHOD.md.
"""

import os as _os

# transformers warns at import time about optional torchvision image processors that
# this project never uses; keep warnings, drop that noise unless the user set a level.
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from chimera_ray.config import Config, ConfigError, load_config  # noqa: E402


def __getattr__(name: str):
    # The layer needs torch; importing the package (or `chimera-ray --help`) should not.
    if name == "MultiHeadLoRALinear":
        from chimera_ray.lora.layer import MultiHeadLoRALinear

        return MultiHeadLoRALinear
    raise AttributeError(f"module 'chimera_ray' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config", "MultiHeadLoRALinear", "__version__"]
