"""The XLA options the library compiles its steps with on CPU.

jaxlib 0.10.2 hands dots, reductions and convolutions to YNNPACK on CPU, and YNNPACK runs a
convolution on one thread: on two cores XLA's own (Eigen) convolutions ran the xresnet18
training step 1.2x faster (docs/performance-vision.md). Steps therefore compile with YNNPACK
kept for dots and reductions only. Programs without convolutions (the text models) compile
to the same code either way.
"""
from __future__ import annotations

import os

import jax

YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
# XLA's CPU default in jaxlib 0.10.2 (INDIVIDUAL_DOT, REDUCE, INDIVIDUAL_CONVOLUTION) minus the last
YNN_WITHOUT_CONVOLUTIONS = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'


def compiler_options() -> dict[str, str]:
  """`jax.jit(..., compiler_options=...)` for the library's steps: on CPU, convolutions
  outside YNNPACK; empty off CPU or where `XLA_FLAGS` already chooses YNNPACK's fusion types."""
  if jax.default_backend() != 'cpu' or YNN_FUSION_TYPE in os.environ.get('XLA_FLAGS', ''):
    return {}
  return {YNN_FUSION_TYPE: YNN_WITHOUT_CONVOLUTIONS}
