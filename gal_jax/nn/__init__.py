"""Our own Flax model families, loaded from and saved to PyTorch-named safetensors.

`layers` holds what every family shares (attention dispatch, fp32 LayerNorm, MLP, logically
partitioned Dense, remat policies), `conv_layers` what the VAE and UNet share (fp32 GroupNorm,
ResnetBlock2D, up/down sampling), `weights` the safetensors <-> param tree mapping (transformers'
and diffusers' names). One module per family: `clip` (text and vision towers), `vae`
(AutoencoderKL), `unet` with `unet_transformer` (UNet2DConditionModel, SD 1.x / 2.x / XL), `dino`
(DINOv2 ViT, for the DINO image-similarity metric).
`tokens` grows a text tower's token table by new tokens (textual inversion's starting point).
"""
