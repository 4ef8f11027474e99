"""XLA's compiled memory analysis of one generator + discriminator training step, per remat policy.

  python bench/memory.py [--batch 20] [--patch 128] [--dtype bfloat16|float32]
                         [--policies none,attention,block] [--config configs/base.py]
  python bench/memory.py --trainer --policies block [--r1_chunks 1,4]

The step (compiled, never run; parameters and data are abstract shapes): the generator forward
and backward on a Charbonnier loss plus a simple adversarial term -0.1*mean D(rgb, fake) through
a train-mode discriminator; then the discriminator forward and backward on real and detached
fake batches (softplus GAN loss); Adam updates for both, with parameters and optimizer states
donated. Batch 20 is one micro-batch (the default recipe's gradient accumulation 2 uses 10).

`--trainer` analyses the trainer's own step instead (`train.train_step` of the config: the
Sinkhorn divergences, R1 (the program of R1 steps), EMA, non-finite skips), per policy and per
`loss.r1_chunks`. Measured on 2 CPU cores, configs/gan.py, batch 20, block (XLA temp / peak,
GiB): r1_chunks 1: 32.05 / 32.32 (the step then fails to allocate on a 24 GiB machine);
r1_chunks 4: 15.70 / 15.97; with `--disc_remat on`: r1_chunks 4: 14.71 / 14.98, r1_chunks 20:
10.49 / 10.76. Compile 230-340 s each.

Prints, per generator `model.remat` policy, XLA's `compiled.memory_analysis()`: temp
(intermediates and activations kept for the backward pass), argument, output, alias (outputs
written into donated arguments) and generated code sizes, and peak = argument + output - alias
+ temp, and the backend-independent "residuals": the activations reverse mode keeps from the
forward pass for the backward pass, for the generator loss (G + the D call on the fake) and
for the discriminator loss (D on real and fake), which is what a remat policy changes.

XLA figures are for the backend JAX picks (GPU when present). On CPU they are indicative only:
XLA CPU keeps many bfloat16 intermediates in float32. Its concurrency-optimised scheduler,
which hoisted recomputation back into the forward pass, is turned off by `import cswin_jax`
(see `cswin_jax/__init__.py`), and the generator's remat is `layers.ordered_checkpoint`
(`jax.checkpoint` saved nothing on XLA CPU). Measured on 2 CPU cores, batch 20, bfloat16
(XLA temp / peak, GiB): none 79.4 / 79.7, attention 57.3 / 57.6, block 15.8 / 16.0; the
generator's forward+backward alone with block: 8.7. Compiling the default width on CPU
takes 4-7 minutes per policy; `--residuals_only` takes seconds.
"""

from __future__ import annotations

import os

# The step is compiled, never run, so machine-code optimisation is wasted time: buffer
# assignment (what memory_analysis reports) comes from the HLO passes, which this flag does not
# touch (checked: identical figures, 2-3x faster compile on CPU). Must be set before jax loads.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import functools
import importlib.util
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import optax
from absl import flags

import cswin_jax
from cswin_jax import cli
from cswin_jax.losses import charbonnier
from cswin_jax.models.discriminator import build_discriminator
from cswin_jax.models.generator import build_generator

_BATCH = flags.DEFINE_integer("batch", 20, "patches per micro-batch")
_PATCH = flags.DEFINE_integer("patch", 128, "patch side in pixels")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype")
_POLICIES = flags.DEFINE_string(
    "policies", "none,attention,block", "comma-separated generator model.remat policies"
)
_CONFIG = flags.DEFINE_string(
    "config", str(pathlib.Path(__file__).parents[1] / "configs/base.py"), "recipe file"
)
_BASE_CHANNELS = flags.DEFINE_integer("base_channels", None, "override G width")
_DISC_BASE_DIM = flags.DEFINE_integer("disc_base_dim", None, "override D width")
_DISC_REMAT = flags.DEFINE_enum(
    "disc_remat", "config", ["config", "on", "off"],
    "discriminator block remat (default: config.discriminator.remat, else off)",
)  # fmt: skip
_RESIDUALS_ONLY = flags.DEFINE_bool(
    "residuals_only", False, "skip compiling (seconds, not minutes)"
)
_TRAINER = flags.DEFINE_bool(
    "trainer", False,
    "analyse train.train_step of the config (Sinkhorn, R1, EMA; compute dtype from "
    "config.mixed_precision) instead of the simplified step",
)  # fmt: skip
_R1_CHUNKS = flags.DEFINE_string(
    "r1_chunks", "1", "with --trainer: comma-separated loss.r1_chunks values to analyse"
)

GIB = 1024**3
ADV_WEIGHT = 0.1


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", pathlib.Path(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def make_losses(gen, disc):
    """(generator loss, discriminator loss) of one training iteration."""

    def gen_loss(gen_params, disc_params, disc_sn, rgb, hsi):
        fake = gen.apply({"params": gen_params}, rgb, train=True, step=1)
        logits, updates = disc.apply(
            {"params": disc_params, "spectral_norm": disc_sn},
            rgb,
            fake,
            train=True,
            mutable=["spectral_norm"],
        )
        loss = charbonnier(fake, hsi) - ADV_WEIGHT * jnp.mean(logits)
        return loss, (fake, updates["spectral_norm"])

    def disc_loss(disc_params, disc_sn, rgb, hsi, fake):
        real_logits, upd = disc.apply(
            {"params": disc_params, "spectral_norm": disc_sn},
            rgb,
            hsi,
            train=True,
            mutable=["spectral_norm"],
        )
        fake_logits, upd = disc.apply(
            {"params": disc_params, "spectral_norm": upd["spectral_norm"]},
            rgb,
            jax.lax.stop_gradient(fake),
            train=True,
            mutable=["spectral_norm"],
        )
        loss = jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
        return loss, upd["spectral_norm"]

    return gen_loss, disc_loss


def make_step(gen, disc, tx_g, tx_d):
    """One G update then one D update (the original trainer's per-iteration order)."""
    gen_loss, disc_loss = make_losses(gen, disc)

    def step(gen_params, gen_opt, disc_params, disc_sn, disc_opt, rgb, hsi):
        (_, (fake, sn)), g_grads = jax.value_and_grad(gen_loss, has_aux=True)(
            gen_params, disc_params, disc_sn, rgb, hsi
        )
        g_updates, gen_opt = tx_g.update(g_grads, gen_opt, gen_params)
        gen_params = optax.apply_updates(gen_params, g_updates)
        (_, sn), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(
            disc_params, sn, rgb, hsi, fake
        )
        d_updates, disc_opt = tx_d.update(d_grads, disc_opt, disc_params)
        disc_params = optax.apply_updates(disc_params, d_updates)
        return gen_params, gen_opt, disc_params, sn, disc_opt

    return step


def residual_gib(loss_fn, *args) -> float:
    """GiB that reverse mode keeps from the forward pass of `loss_fn(*args)` for its backward
    pass (the leaves of the VJP closure: activations, plus the arguments it keeps). Backend
    independent: what remat policies change."""
    vjp_fn = jax.eval_shape(lambda *a: jax.vjp(lambda *b: loss_fn(*b)[0], *a)[1], *args)
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(vjp_fn)) / GIB


def analyse(config, policy: str, batch: int, patch: int, dtype, compile_step: bool):
    config.model.remat = policy
    gen = build_generator(config.model, dtype=dtype)
    disc = build_discriminator(config.discriminator, dtype=dtype)
    tx_g, tx_d = optax.adam(2e-4, b1=0.5), optax.adam(5e-5, b1=0.5)
    rgb = jax.ShapeDtypeStruct((batch, patch, patch, config.model.in_channels), jnp.float32)
    hsi = jax.ShapeDtypeStruct((batch, patch, patch, config.model.out_channels), jnp.float32)
    key = jax.random.key(0)
    gen_params = jax.eval_shape(lambda: gen.init(key, jnp.zeros((1, 32, 32, 3)))["params"])
    disc_vars = jax.eval_shape(
        lambda: disc.init(key, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 31)))
    )
    gen_opt = jax.eval_shape(tx_g.init, gen_params)
    disc_opt = jax.eval_shape(tx_d.init, disc_vars["params"])
    gen_loss, disc_loss = make_losses(gen, disc)
    disc_params, disc_sn = disc_vars["params"], disc_vars["spectral_norm"]
    row = {
        "res_g": residual_gib(gen_loss, gen_params, disc_params, disc_sn, rgb, hsi),
        "res_d": residual_gib(
            disc_loss, disc_params, disc_sn, rgb, hsi, jax.ShapeDtypeStruct(hsi.shape, dtype)
        ),
    }
    if not compile_step:
        return row
    step = jax.jit(make_step(gen, disc, tx_g, tx_d), donate_argnums=(0, 1, 2, 3, 4))
    start = time.perf_counter()
    compiled = step.lower(
        gen_params, gen_opt, disc_vars["params"], disc_vars["spectral_norm"], disc_opt, rgb, hsi
    ).compile()
    return row | compiled_memory(compiled, time.perf_counter() - start)


def compiled_memory(compiled, compile_s: float) -> dict:
    """`compiled.memory_analysis()` in GiB, plus peak = argument + output - alias + temp."""
    stats = compiled.memory_analysis()
    row = {
        "temp": stats.temp_size_in_bytes / GIB,
        "argument": stats.argument_size_in_bytes / GIB,
        "output": stats.output_size_in_bytes / GIB,
        "alias": stats.alias_size_in_bytes / GIB,
        "code": stats.generated_code_size_in_bytes / GIB,
        "compile_s": compile_s,
    }
    row["peak"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
    return row


def analyse_trainer(config, policy: str, batch: int, patch: int):
    """XLA's memory analysis of the trainer's own step with R1 (`train.train_step` of the
    R1 step kind: Sinkhorn divergences, R1, EMA, non-finite skips), one micro-batch: the
    larger of the loop's two programs."""
    from cswin_jax import schedule, train  # noqa: PLC0415

    config.model.remat = policy
    config.batch_size = batch
    config.data.patch_size = patch
    config.gradient_accumulation_steps = 1
    setup = train.make_setup(config)
    state = jax.eval_shape(functools.partial(train.init_state, setup), jax.random.key(0))
    shape = (1, batch, patch, patch)
    data = {
        "rgb": jax.ShapeDtypeStruct((*shape, config.model.in_channels), jnp.float32),
        "hsi": jax.ShapeDtypeStruct((*shape, config.model.out_channels), jnp.float32),
    }
    start = time.perf_counter()
    step = functools.partial(train.train_step, setup, kind=schedule.StepKind(True, True))
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, data).compile()
    return compiled_memory(compiled, time.perf_counter() - start)


def main(argv) -> None:
    del argv
    config = load_config(_CONFIG.value)
    if _BASE_CHANNELS.value:
        config.model.base_channels = _BASE_CHANNELS.value
    if _DISC_BASE_DIM.value:
        config.discriminator.base_dim = _DISC_BASE_DIM.value
    if _DISC_REMAT.value != "config":
        config.discriminator.remat = _DISC_REMAT.value == "on"
    disc_remat = bool(config.discriminator.get("remat", False))
    print(
        f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind})  batch {_BATCH.value}  "
        f"patch {_PATCH.value}x{_PATCH.value}  compute {_DTYPE.value}  G width "
        f"{config.model.base_channels}  D width {config.discriminator.base_dim}  "
        f"D remat {disc_remat}"
    )
    print(
        "residuals = activations kept for the backward pass (backend independent); XLA = "
        "compiled.memory_analysis() of the whole step on this backend; sizes in GiB"
    )
    if _TRAINER.value:
        config.mixed_precision = _DTYPE.value == "bfloat16"
        columns = ["XLA temp", "argument", "output", "alias", "code MiB", "XLA peak", "compile s"]
        print("train.train_step (one micro-batch):")
        print(f"{'G remat':<10s}{'r1_chunks':>10s}" + "".join(f"{c:>12s}" for c in columns))
        for policy in _POLICIES.value.split(","):
            for chunks in map(int, _R1_CHUNKS.value.split(",")):
                config.loss.r1_chunks = chunks
                row = analyse_trainer(config, policy, _BATCH.value, _PATCH.value)
                values = [row[k] for k in ("temp", "argument", "output", "alias")]
                values += [row["code"] * 1024, row["peak"], row["compile_s"]]
                line = f"{policy:<10s}{chunks:>10d}" + "".join(f"{v:>12.3f}" for v in values)
                print(line, flush=True)
        return
    columns = ["res G+D(fake)", "res D(real,fake)"]
    if not _RESIDUALS_ONLY.value:
        columns += ["XLA temp", "argument", "output", "alias", "code MiB", "XLA peak", "compile s"]
    print(f"{'G remat':<10s}" + "".join(f"{c:>17s}" for c in columns), flush=True)
    for policy in _POLICIES.value.split(","):
        row = analyse(
            config,
            policy,
            _BATCH.value,
            _PATCH.value,
            jnp.dtype(_DTYPE.value),
            not _RESIDUALS_ONLY.value,
        )
        values = [row["res_g"], row["res_d"]]
        if not _RESIDUALS_ONLY.value:
            values += [row["temp"], row["argument"], row["output"], row["alias"]]
            values += [row["code"] * 1024, row["peak"], row["compile_s"]]
        print(f"{policy:<10s}" + "".join(f"{v:>17.3f}" for v in values), flush=True)


if __name__ == "__main__":
    cswin_jax.restart_with_huge_pages()
    cli.run(main, config_flag=None)  # --config is a recipe path here
