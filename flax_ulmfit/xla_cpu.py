"""The XLA options the library compiles its steps with on CPU.

jaxlib 0.10.2 hands dots, reductions and convolutions to YNNPACK on CPU, and YNNPACK runs a
convolution on one thread: on two cores XLA's own (Eigen) convolutions ran the xresnet18
training step 1.2x faster (docs/performance-vision.md). Steps therefore compile with YNNPACK
kept for dots and reductions only. Programs without convolutions (the text models) compile
to the same code either way. An XLA that does not know the option's name or values (another
jaxlib) compiles with its defaults.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
# XLA's CPU default in jaxlib 0.10.2 (INDIVIDUAL_DOT, REDUCE, INDIVIDUAL_CONVOLUTION) minus the last
YNN_WITHOUT_CONVOLUTIONS = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'


def compiler_options() -> dict[str, str]:
  """`jax.jit(..., compiler_options=...)` for the library's steps: on CPU, convolutions
  outside YNNPACK; empty off CPU, where `XLA_FLAGS` already chooses YNNPACK's fusion types,
  or where this XLA does not accept the option."""
  if jax.default_backend() != 'cpu' or YNN_FUSION_TYPE in os.environ.get('XLA_FLAGS', ''):
    return {}
  return {YNN_FUSION_TYPE: YNN_WITHOUT_CONVOLUTIONS} if accepted(YNN_FUSION_TYPE, YNN_WITHOUT_CONVOLUTIONS) else {}


@functools.cache
def accepted(option: str, value: str) -> bool:
  """Whether this XLA compiles a program with `option=value` (one tiny compile per process)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options={option: value}).lower(jnp.zeros(())).compile()
  except RuntimeError:  # jax's JaxRuntimeError: an unknown option name or enum value
    return False
  return True
