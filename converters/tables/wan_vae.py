"""Wan2.1 VAE key tables: the original `Wan2.1_VAE.pth` names and diffusers' AutoencoderKLWan names
(shared/spec/wan.md §2.2, §2.4). Targets are omnijax.models.wan.vae.WanVAE parameter paths.

The encoder is a flat layer list in both formats (so `{i}` rows suffice); the original decoder is flat too
(`decoder.upsamples.K`) while diffusers groups it into up blocks, so the original decoder rows are generated
from the layout: block i holds flat indices i*(R+2) .. i*(R+2)+R (R+1 residual blocks), then its upsampler.
"""

from converters.engine import Rule, Table

PREFIXES = ("model.", "vae.", "first_stage_model.")


def _conv3d(src, dst):
    return [Rule(f"{src}.weight", f"{dst}.kernel", "conv3d_to_thwio"), Rule(f"{src}.bias", f"{dst}.bias")]


def _conv2d(src, dst):
    return [Rule(f"{src}.weight", f"{dst}.kernel", "conv2d_to_hwio"), Rule(f"{src}.bias", f"{dst}.bias")]


def _point(src, dst):
    return [Rule(f"{src}.weight", f"{dst}.kernel", "conv1x1_to_io"), Rule(f"{src}.bias", f"{dst}.bias")]


def _gamma(src, dst):
    return [Rule(f"{src}.gamma", f"{dst}.scale", "squeeze")]


def _resblock(src, dst, *, original: bool):
    """Rows of one residual block; the original stores it as Sequential indices 0 (RMS), 2 (conv), 3 (RMS), 6 (conv)."""
    n1, c1, n2, c2, sc = (("residual.0", "residual.2", "residual.3", "residual.6", "shortcut") if original
                          else ("norm1", "conv1", "norm2", "conv2", "conv_shortcut"))
    return [*_gamma(f"{src}.{n1}", f"{dst}.norm1"), *_conv3d(f"{src}.{c1}", f"{dst}.conv1"),
            *_gamma(f"{src}.{n2}", f"{dst}.norm2"), *_conv3d(f"{src}.{c2}", f"{dst}.conv2"),
            *_conv3d(f"{src}.{sc}", f"{dst}.conv_shortcut")]


def _resample(src, dst):
    return [*_conv2d(f"{src}.resample.1", f"{dst}.conv"), *_conv3d(f"{src}.time_conv", f"{dst}.time_conv")]


def _attention(src, dst):
    return [*_gamma(f"{src}.norm", f"{dst}.norm"), *_point(f"{src}.to_qkv", f"{dst}.to_qkv"),
            *_point(f"{src}.proj", f"{dst}.proj")]


def original_table(num_levels: int = 4, num_res_blocks: int = 2) -> Table:
    """The original Wan / VideoX-Fun (`Wan2.1_VAE.pth`) table for a VAE with this many levels and blocks."""
    rows = [*_conv3d("conv1", "quant_conv"), *_conv3d("conv2", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rows += _conv3d(f"{part}.conv1", f"{part}.conv_in")
        rows += _resblock(f"{part}.middle.0", f"{part}.mid_block.resnets.0", original=True)
        rows += _attention(f"{part}.middle.1", f"{part}.mid_block.attentions.0")
        rows += _resblock(f"{part}.middle.2", f"{part}.mid_block.resnets.1", original=True)
        rows += _gamma(f"{part}.head.0", f"{part}.norm_out") + _conv3d(f"{part}.head.2", f"{part}.conv_out")
    rows += _resblock("encoder.downsamples.{i}", "encoder.down_blocks.{i}", original=True)
    rows += _resample("encoder.downsamples.{i}", "encoder.down_blocks.{i}")
    per_block = num_res_blocks + 2
    for i in range(num_levels):
        for j in range(num_res_blocks + 1):
            rows += _resblock(f"decoder.upsamples.{i * per_block + j}", f"decoder.up_blocks.{i}.resnets.{j}",
                              original=True)
        if i < num_levels - 1:
            rows += _resample(f"decoder.upsamples.{i * per_block + num_res_blocks + 1}",
                              f"decoder.up_blocks.{i}.upsampler")
    return Table(name="wan_vae/original", prefixes=PREFIXES, rules=rows)


def _diffusers_rows():
    rows = [*_conv3d("quant_conv", "quant_conv"), *_conv3d("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rows += _conv3d(f"{part}.conv_in", f"{part}.conv_in")
        rows += _resblock(f"{part}.mid_block.resnets.{{j}}", f"{part}.mid_block.resnets.{{j}}", original=False)
        rows += _attention(f"{part}.mid_block.attentions.0", f"{part}.mid_block.attentions.0")
        rows += _gamma(f"{part}.norm_out", f"{part}.norm_out") + _conv3d(f"{part}.conv_out", f"{part}.conv_out")
    rows += _resblock("encoder.down_blocks.{i}", "encoder.down_blocks.{i}", original=False)
    rows += _resample("encoder.down_blocks.{i}", "encoder.down_blocks.{i}")
    rows += _resblock("decoder.up_blocks.{i}.resnets.{j}", "decoder.up_blocks.{i}.resnets.{j}", original=False)
    rows += _resample("decoder.up_blocks.{i}.upsamplers.0", "decoder.up_blocks.{i}.upsampler")
    return rows


DIFFUSERS = Table(name="wan_vae/diffusers", prefixes=PREFIXES, rules=_diffusers_rows())
ORIGINAL = original_table()
TABLES = (ORIGINAL, DIFFUSERS)
