"""cclddg: CLOOB-conditioned latent denoising diffusion GANs.

`from cclddg import CCLDDGPipeline` (and the components diffusers loads from a model folder's model_index.json)
import lazily, so `import cclddg` and the command line stay light.
"""

__version__ = "0.1.0"

_LAZY = {
    "CCLDDGPipeline": "cclddg.model_folder",
    "CCLDDGPipelineOutput": "cclddg.model_folder",
    "export_run": "cclddg.model_folder",
    "CCLDDGScheduler": "cclddg.scheduler",
    "EmbedderModel": "cclddg.encoders.component",
    "FlowPrior": "cclddg.priors.flow",
    "UNet": "cclddg.models",
    "Discriminator": "cclddg.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cclddg' has no attribute {name!r}")


__all__ = sorted(_LAZY)
