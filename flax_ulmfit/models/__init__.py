"""Flax NNX models: AWD-LSTM language model (and, with the vision issue, XResNet)."""
from flax_ulmfit.models.awd_lstm import (AWDLSTM, LanguageModel, LinearDecoder, LMExtras,
                                         awd_lstm_clas_config, awd_lstm_lm_config)
from flax_ulmfit.models.dropout import EmbeddingDropout, RNNDropout, WeightDropout, dropout_mask
from flax_ulmfit.models.lstm import LSTM

__all__ = ['AWDLSTM', 'LanguageModel', 'LinearDecoder', 'LMExtras', 'awd_lstm_lm_config',
           'awd_lstm_clas_config', 'EmbeddingDropout', 'RNNDropout', 'WeightDropout',
           'dropout_mask', 'LSTM']
