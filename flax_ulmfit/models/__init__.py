"""Flax NNX models: the AWD-LSTM language model, the text classifier and the XResNet family."""
from flax_ulmfit.models.awd_lstm import (AWDLSTM, LanguageModel, LinearDecoder, LMExtras,
                                         awd_lstm_clas_config, awd_lstm_lm_config)
from flax_ulmfit.models.classifier import (PoolingLinearClassifier, SentenceEncoder, TextClassifier,
                                           masked_concat_pool)
from flax_ulmfit.models.dropout import EmbeddingDropout, RNNDropout, WeightDropout, dropout_mask
from flax_ulmfit.models.lstm import LSTM
from flax_ulmfit.models.xresnet import XResNet, xresnet18, xresnet34, xresnet50, xresnet101, xresnet152

__all__ = ['AWDLSTM', 'LanguageModel', 'LinearDecoder', 'LMExtras', 'awd_lstm_lm_config',
           'awd_lstm_clas_config', 'TextClassifier', 'SentenceEncoder', 'PoolingLinearClassifier',
           'masked_concat_pool', 'EmbeddingDropout', 'RNNDropout', 'WeightDropout',
           'dropout_mask', 'LSTM', 'XResNet', 'xresnet18', 'xresnet34', 'xresnet50', 'xresnet101',
           'xresnet152']
