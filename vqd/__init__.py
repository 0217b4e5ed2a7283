"""vqd: the VQ-Diffusion model library.

Importing the package is cheap: submodules are imported where they are used
(`from vqd.diffusion import MaskAndReplaceDiffusion`), so `import vqd` pulls in nothing heavier
than torch-free metadata. The library never imports `training/` or `data_pipeline/`.
"""

__version__ = "0.1.0"
