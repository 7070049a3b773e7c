"""Parity tests compare fp32 numbers: keep matmuls at full precision (no TF32/bf16 passes)."""
import jax

jax.config.update('jax_default_matmul_precision', 'highest')
