"""flax_ulmfit: fast.ai's AWD-LSTM, ULMFiT and XResNet recipes in JAX/Flax NNX."""
__version__ = '0.1.0'
