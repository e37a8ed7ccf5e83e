"""Flux.1 VAE key tables: BFL's `ae.safetensors` names and diffusers' AutoencoderKL names (spec/flux.md §1.12).

Targets are omnijax.models.flux.vae.FluxVAE parameter paths, which follow diffusers (up blocks in execution
order). BFL indexes its decoder `up` list by resolution level (0 = full resolution, run last), so its decoder
rows are generated from the number of levels: diffusers up_blocks.k is BFL up.(levels - 1 - k).
"""

from converters.engine import Rule, Table, linear, norm

PREFIXES = ("first_stage_model.", "vae.", "model.")


def _conv(src, dst):
    return [Rule(f"{src}.weight", f"{dst}.kernel", "conv2d_to_hwio"), Rule(f"{src}.bias", f"{dst}.bias")]


def _point(src, dst):
    return [Rule(f"{src}.weight", f"{dst}.kernel", "conv1x1_to_io"), Rule(f"{src}.bias", f"{dst}.bias")]


def _resnet(src, dst, shortcut):
    return [*norm(f"{src}.norm1", f"{dst}.norm1"), *_conv(f"{src}.conv1", f"{dst}.conv1"),
            *norm(f"{src}.norm2", f"{dst}.norm2"), *_conv(f"{src}.conv2", f"{dst}.conv2"),
            *_point(f"{src}.{shortcut}", f"{dst}.conv_shortcut")]


def _diffusers_mid(part):
    src, dst = f"{part}.mid_block", f"{part}.mid_block"
    a = f"{src}.attentions.0"
    return [*_resnet(f"{src}.resnets.{{j}}", f"{dst}.resnets.{{j}}", "conv_shortcut"),
            *norm(f"{a}.group_norm", f"{dst}.attentions.0.group_norm"),
            *[r for n in ("to_q", "to_k", "to_v") for r in linear(f"{a}.{n}", f"{dst}.attentions.0.{n}")],
            *linear(f"{a}.to_out.0", f"{dst}.attentions.0.to_out")]


DIFFUSERS = Table(
    name="flux_vae/diffusers",
    prefixes=PREFIXES,
    rules=[
        *_conv("encoder.conv_in", "encoder.conv_in"),
        *_resnet("encoder.down_blocks.{i}.resnets.{j}", "encoder.down_blocks.{i}.resnets.{j}", "conv_shortcut"),
        *_conv("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.down_blocks.{i}.downsampler"),
        *_diffusers_mid("encoder"),
        *norm("encoder.conv_norm_out", "encoder.conv_norm_out"),
        *_conv("encoder.conv_out", "encoder.conv_out"),
        *_conv("decoder.conv_in", "decoder.conv_in"),
        *_diffusers_mid("decoder"),
        *_resnet("decoder.up_blocks.{i}.resnets.{j}", "decoder.up_blocks.{i}.resnets.{j}", "conv_shortcut"),
        *_conv("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder.up_blocks.{i}.upsampler"),
        *norm("decoder.conv_norm_out", "decoder.conv_norm_out"),
        *_conv("decoder.conv_out", "decoder.conv_out"),
    ],
)


def _bfl_mid(part):
    src, dst = f"{part}.mid", f"{part}.mid_block"
    return [*_resnet(f"{src}.block_1", f"{dst}.resnets.0", "nin_shortcut"),
            *_resnet(f"{src}.block_2", f"{dst}.resnets.1", "nin_shortcut"),
            *norm(f"{src}.attn_1.norm", f"{dst}.attentions.0.group_norm"),
            *[r for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out"))
              for r in _point(f"{src}.attn_1.{a}", f"{dst}.attentions.0.{b}")]]


def bfl_table(levels: int) -> Table:
    """The BFL `ae.safetensors` table for a VAE with `levels` resolution levels (4 for Flux.1)."""
    up = []
    for k in range(levels):
        src, dst = f"decoder.up.{levels - 1 - k}", f"decoder.up_blocks.{k}"
        up += [*_resnet(f"{src}.block.{{j}}", f"{dst}.resnets.{{j}}", "nin_shortcut"),
               *_conv(f"{src}.upsample.conv", f"{dst}.upsampler")]
    return Table(
        name="flux_vae/bfl",
        prefixes=PREFIXES,
        rules=[
            *_conv("encoder.conv_in", "encoder.conv_in"),
            *_resnet("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}", "nin_shortcut"),
            *_conv("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsampler"),
            *_bfl_mid("encoder"),
            *norm("encoder.norm_out", "encoder.conv_norm_out"),
            *_conv("encoder.conv_out", "encoder.conv_out"),
            *_conv("decoder.conv_in", "decoder.conv_in"),
            *_bfl_mid("decoder"),
            *up,
            *norm("decoder.norm_out", "decoder.conv_norm_out"),
            *_conv("decoder.conv_out", "decoder.conv_out"),
        ],
    )
