"""The Flux FLOP model of the MFU figures (benchmarks.common.flux_flops) against the matmuls JAX actually traces.

The reference is independent of the formula: every dot_general in the jaxpr of the DiffDecompose loss (forward) and
of its gradient w.r.t. the LoRA (the training step's work), counted from the operands' shapes, at the dev model's
width (3072, 24 heads) and the issue's token counts (512 text + 3 x 1,024 image), one block of each kind. The XLA
attention backend is used so that attention is plain matmuls in the jaxpr.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import omnijax.layers.lora as lora_module
from benchmarks.common import flux_flops
from omnijax.diffdecompose.model import DiffDecomposer, ICDSettings, decompose_loss
from omnijax.models.flux import variant
from omnijax.models.flux.dit import FluxDiT
from omnijax.models.flux.lora import FluxLoRA, lora_spec


def _dot_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            batch = np.prod([lhs[i] for i in lb])
            contract = np.prod([lhs[i] for i in lc])
            free_l = np.prod([d for i, d in enumerate(lhs) if i not in lc and i not in lb])
            rb = eqn.params["dimension_numbers"][1][1]
            free_r = np.prod([d for i, d in enumerate(rhs) if i not in rc and i not in rb])
            total += 2.0 * batch * contract * free_l * free_r
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _dot_flops(sub)
    return total


@pytest.mark.parametrize("lora_on", [(True, True, True), (True, False, False)])
def test_flux_flops_match_the_traced_matmuls(lora_on, monkeypatch):
    # Sliced gating: the adapters then multiply exactly the tokens they adapt. (The default masked gating of the
    # single blocks also runs them on the text tokens and discards that: hardware work, not model work.)
    monkeypatch.setattr(lora_module, "MASK_COVERAGE", 1.01)
    cfg = variant("dev", depth=1, depth_single_blocks=1)
    lat, txt_len = 64, 512  # a 512x512 image: 32 x 32 = 1,024 packed tokens per layer

    def build():
        dit = FluxDiT(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        lora = FluxLoRA(cfg, lora_spec(cfg, 128), dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
        return DiffDecomposer(dit, lora, ICDSettings(lora_on=lora_on))

    model = nnx.eval_shape(build)
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    s = jax.ShapeDtypeStruct
    z = s((1, lat, lat, cfg.in_channels // 4), jnp.float32)
    batch = dict(z_composite=z, z_foreground=z, z_background=z, txt=s((1, txt_len, cfg.context_in_dim), jnp.bfloat16),
                 y=s((1, cfg.vec_in_dim), jnp.float32))
    loss = lambda p, r, b: decompose_loss(nnx.merge(graphdef, p, r), b, jax.random.key(0), attention_backend="xla")[0]
    forward = _dot_flops(jax.make_jaxpr(loss)(params, rest, batch).jaxpr)
    step = _dot_flops(jax.make_jaxpr(jax.grad(loss))(params, rest, batch).jaxpr)

    tokens = 3 * (lat // 2) ** 2
    lora_tokens = tokens * sum(lora_on) // 3
    want_fwd = flux_flops(tokens, txt_len, cfg, lora=model.lora, lora_tokens=lora_tokens)
    want_step = flux_flops(tokens, txt_len, cfg, lora_train=True, lora=model.lora, lora_tokens=lora_tokens)
    # What the model leaves out (embedders, modulation, final layer, row-level adapters) is < 1 % here.
    assert forward == pytest.approx(want_fwd, rel=0.01)
    assert step == pytest.approx(want_step, rel=0.01)
    # The earlier count (two forwards, no adapters: attention's backward taken as 1x) is off by more than that,
    # and so is leaving out the adapters when they act on every image token.
    assert abs(step - 2 * flux_flops(tokens, txt_len, cfg)) / step > 0.05
    if all(lora_on):
        assert abs(step - flux_flops(tokens, txt_len, cfg, lora_train=True)) / step > 0.01
