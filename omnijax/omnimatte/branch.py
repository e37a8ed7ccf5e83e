"""EasyOmnimatte's branch-token model: a frozen Wan DiT run on [X_B ; X_A] with LoRA on the alpha set only.

Axis letters: B batch, T latent frames, H/W latent grid, L tokens per set, N heads, K head dim, D model dim.

shared/spec/easyomnimatte.md §2. Both token sets are patch-embedded from [z ; y] with the same (frozen) patch
embedding, share the timestep, text and CLIP context, and use the SAME RoPE positions (cloned, not continued).
Every block runs the frozen WanBlock's own parts; in adapted blocks the alpha set X_A adds the low-rank
deltas (explicit `lora=` arguments), the background set X_B never does. Self-attention couples the sets
through the structured masks of omnijax.layers.branch_attention (never a 2L x 2L mask).

The two sets travel as separate [B, L, D] arrays, not one 2L sequence: the background stream then needs no
backward pass at all (under masks B and C it depends on nothing trainable and is put under stop_gradient),
and a Quality Expert training step (mask C) runs the alpha set alone.

Sharding: the mesh is fixed when the expert is built (`mesh=`, or `set_mesh`), never read from an enclosing
`jax.set_mesh`. With a mesh, each residual stream is constrained to ("batch", "tokens", "embed") after the
embedding and at every block's output (omnijax.sharding.constrain: batch over data x fsdp, tokens over context),
and with a context axis > 1 the branch self-attention is context-parallel (`context_method`: Ulysses / ring), so
XLA keeps whole blocks split over tokens. Without a mesh the model runs plain, on whatever devices hold it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from omnijax.layers.block_scan import run_blocks
from omnijax.layers.branch_attention import alpha_sees_background, background_sees_alpha, branch_attention
from omnijax.layers.lora import LoRA
from omnijax.models.wan.dit import WanDiT
from omnijax.omnimatte.experts import ExpertConfig
from omnijax.sharding import constrain


def _residual(x, mesh):
    """Pins a residual stream [B, L, D] to batch x tokens on `mesh` (None passes through; no mesh: unchanged)."""
    return x if x is None or mesh is None else constrain(x, "batch", "tokens", "embed", mesh=mesh)


def _target_dims(cfg, target: str) -> tuple[int, int]:
    if target == "ffn.linear_1":
        return cfg.dim, cfg.ffn_dim
    if target == "ffn.linear_2":
        return cfg.ffn_dim, cfg.dim
    return cfg.dim, cfg.dim


class BranchLoRA(nnx.Module):
    """The adapters of one expert: `blocks[str(i)][group][name]` is a LoRA, e.g. blocks["27"]["self_attn"]["q"].

    Group and name follow the WanBlock's own attribute paths ("self_attn.q", "ffn.linear_1", ...), so the
    nested mapping of one block is exactly the `lora=` argument the block's parts take.
    """

    def __init__(self, wan_config, expert: ExpertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None):
        expert.validate_for(wan_config.num_layers, wan_config.is_i2v)
        self.expert = expert
        blocks = {}
        for b in expert.blocks:
            groups: dict[str, dict[str, LoRA]] = {}
            for target in expert.targets:
                group, name = target.split(".")
                din, dout = _target_dims(wan_config, target)
                groups.setdefault(group, {})[name] = LoRA(din, dout, rank=expert.rank, alpha=expert.alpha,
                                                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            blocks[str(b)] = nnx.Dict({g: nnx.Dict(m) for g, m in groups.items()})
        self.blocks = nnx.Dict(blocks)

    def for_block(self, index: int):
        """The {group: {name: LoRA}} mapping of block `index`, or None where the block is not adapted."""
        return self.blocks.get(str(index))


def branch_block(blk, lora, x_b, x_a, e0, text, image, rope, *, mask: str, backend: str, freeze_background: bool,
                 mesh=None, context_method: str = "auto"):
    """One WanBlock over both sets. x_b may be None (mask C, alpha set alone). Returns (x_b, x_a).

    mesh, context_method: the model's placement (see the module docstring); None runs the block plain."""
    cos, sin = rope
    cross_backend = "auto" if backend == "splash" else backend  # splash serves the self-attention masks only
    mod = blk.modulate(e0)
    sa = None if lora is None else lora.get("self_attn")
    q_a, k_a, v_a = blk.self_attn.qkv(blk.attn_input(x_a, mod), cos, sin, sa)
    q_b = k_b = v_b = None
    if x_b is not None:
        q_b, k_b, v_b = blk.self_attn.qkv(blk.attn_input(x_b, mod), cos, sin)
    o_b, o_a = branch_attention(q_b, k_b, v_b, q_a, k_a, v_a, mask=mask, backend=backend,
                                freeze_background=freeze_background, context_mesh=mesh, context_method=context_method)
    x_a = blk.finish(x_a, blk.self_attn.project(o_a, sa), mod, text, image, backend=cross_backend, lora=lora)
    if x_b is not None:
        x_b = blk.finish(x_b, blk.self_attn.project(o_b), mod, text, image, backend=cross_backend)
    return _residual(x_b, mesh), _residual(x_a, mesh)


class EasyOmnimatte(nnx.Module):
    """One expert: the frozen base WanDiT (shared between experts) plus its BranchLoRA.

    Several experts may hold the same `base` object; NNX keeps it one set of arrays.
    """

    def __init__(self, base: WanDiT, expert: ExpertConfig, *, lora_dtype=None, lora_param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None, mesh=None, context_method: str = "auto"):
        """rngs None: the adapters are built abstractly (shapes only, no random init), for a caller that fills
        every one of them next (omnijax.omnimatte.lora_io.expert_with_lora)."""
        self.base = base
        self.expert = expert
        self.set_mesh(mesh, context_method)
        self.lora = BranchLoRA(base.config, expert, dtype=base.dtype if lora_dtype is None else lora_dtype,
                               param_dtype=lora_param_dtype, rngs=rngs)

    def set_mesh(self, mesh, context_method: str = "auto") -> None:
        """The mesh the expert runs on (activation constraints, context-parallel attention); None: plain."""
        self.mesh, self.context_method = mesh, context_method

    def __call__(self, z_bg, z_alpha, timesteps, context, clip_features=None, y=None, *, train: bool = False,
                 attention_backend: str = "auto", remat: bool | int = False, scan: bool = True):
        """Velocities of both token sets.

        Args:
          z_bg: [B, T, H, W, 16] noisy background latent (training: the noisy ground-truth background). May be
            None when `train` is set and the mask is "C" (the background set does not reach the loss).
          z_alpha: [B, T, H, W, 16] noisy alpha latent.
          timesteps: [B] in 0..1000, shared by both sets.
          context: [B, S, text_dim]; clip_features: [B, 257, image_dim] (i2v); y: [B, T, H, W, 20] condition,
            shared by both sets.
          train: training forward: only the alpha velocity is returned; the background stream and everything
            before the first adapted block run under stop_gradient; under mask "C" the background set is
            skipped entirely (N tokens instead of 2N).
          attention_backend: "auto" | "cudnn" | "fa3" | "xla" | "splash" for the branch self-attention.
          remat: which trainable blocks recompute their forward in the backward pass: True (or -1) all of them,
            False (or 0) none, an int n the first n from the first adapted block on (blocks before it have no
            backward pass). A partial count trades memory for speed: each recomputed block costs one more forward.
          scan: at inference, run runs of identical blocks (the frozen ones, the adapted ones) as lax.scan loops
            (omnijax.layers.block_scan: one traced block per run; same values). Training keeps the unrolled blocks.
        Returns:
          (v_bg, v_alpha), each [B, T, H, W, 16]; v_bg is None when `train` is set.
        """
        base, mask = self.base, self.expert.mask
        skip_bg = train and not alpha_sees_background(mask)
        if z_bg is None and not skip_bg:
            raise ValueError(f"mask {mask!r} {'at inference ' if not train else ''}needs the background latent")
        if z_bg is not None and z_bg.shape != z_alpha.shape:
            raise ValueError(f"background latent {z_bg.shape} and alpha latent {z_alpha.shape} differ in shape")
        x_a, rope, grid = base.embed(z_alpha, y)
        x_b = None if skip_bg else base.embed(z_bg, y)[0]  # same grid, so the RoPE positions are the same
        x_a, x_b = _residual(x_a, self.mesh), _residual(x_b, self.mesh)
        e, e0, text, image = base.condition(timesteps, context, clip_features)
        # Unless the background queries see the alpha set (mask A), nothing trainable reaches the background set.
        freeze_bg = train and not background_sees_alpha(mask)
        first = self.expert.blocks[0]
        def step(blk, lora, x_b, x_a):
            return branch_block(blk, lora, x_b, x_a, e0, text, image, rope, mask=mask, backend=attention_backend,
                                freeze_background=freeze_bg, mesh=self.mesh, context_method=self.context_method)

        if not train:
            items = [(blk, self.lora.for_block(i)) for i, blk in enumerate(base.blocks)]
            x_b, x_a = run_blocks(lambda m, c: step(m[0], m[1], *c), items, (x_b, x_a), scan=scan)
            return base.unpatchify(base.head(x_b, e), grid), base.unpatchify(base.head(x_a, e), grid)
        recompute = remat_blocks(remat, first, len(base.blocks))
        step_remat = _rematerialized(step)
        for i, blk in enumerate(base.blocks):
            if i == first:
                # No LoRA upstream: no backward pass is needed through the earlier blocks.
                x_a = jax.lax.stop_gradient(x_a)
            if freeze_bg and x_b is not None:
                x_b = jax.lax.stop_gradient(x_b)
            x_b, x_a = (step_remat if i in recompute else step)(blk, self.lora.for_block(i), x_b, x_a)
        return None, base.unpatchify(base.head(x_a, e), grid)


def remat_blocks(remat: bool | int, first: int, num_blocks: int) -> range:
    """The block indices a training forward recomputes (see EasyOmnimatte.__call__'s `remat`)."""
    if isinstance(remat, bool) or remat == -1:
        n = num_blocks if remat else 0
    elif remat < 0:
        raise ValueError(f"remat must be a bool, -1 (all blocks) or a block count >= 0, got {remat}")
    else:
        n = int(remat)
    return range(first, min(first + n, num_blocks))


def _rematerialized(step):
    """jax.checkpoint over a block step. The modules go in as (graphdef, state) and are merged inside, so
    the checkpoint is a pure function (nnx.remat writes state back to its module arguments, which fails when
    the model itself was merged inside an outer jax transform such as jax.jit(jax.grad(...)))."""

    def wrapped(blk, lora, x_b, x_a):
        graphdef, state = nnx.split((blk, lora))

        def pure(state, x_b, x_a):
            return step(*nnx.merge(graphdef, state), x_b, x_a)

        return jax.checkpoint(pure)(state, x_b, x_a)

    return wrapped


def lora_state(model) -> nnx.State:
    """The trainable state (nnx.LoRAParam only) of an expert or any module holding adapters."""
    return nnx.state(model, nnx.LoRAParam)
