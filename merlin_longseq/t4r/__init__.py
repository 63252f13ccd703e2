"""Transformers4Rec adapters (needs the `merlin` extra). The core package never imports this module."""
from merlin_longseq.models.hstu import HSTUConfig
from merlin_longseq.t4r.hstu import HSTUBlock, hstu_config_from
from merlin_longseq.t4r.masking import LengthExtrapolationMasking
from merlin_longseq.t4r.metrics import AUC, GAUC, LogLoss, ranking_metrics
from merlin_longseq.t4r.request import (BLOCKS, DINBlock, LONGERBlock, MeanPoolBlock, RequestBatchPadding,
                                        RequestBinaryClassificationTask, RequestBlock, RequestDataLoader, STCABlock,
                                        ULTRAHSTUBlock, block_for, columns_and_sizes, find_request_block, headed_core_model,
                                        request_dataloader)
from merlin_longseq.t4r.training import request_model, training_arguments
from merlin_longseq.request import RequestColumns

__all__ = ["AUC", "BLOCKS", "DINBlock", "GAUC", "HSTUBlock", "HSTUConfig", "LengthExtrapolationMasking", "LogLoss",
           "LONGERBlock", "MeanPoolBlock", "RequestBatchPadding", "RequestBinaryClassificationTask", "RequestBlock",
           "RequestColumns", "RequestDataLoader", "STCABlock", "ULTRAHSTUBlock", "block_for", "columns_and_sizes", "find_request_block",
           "headed_core_model", "hstu_config_from", "ranking_metrics", "request_dataloader", "request_model",
           "training_arguments"]
