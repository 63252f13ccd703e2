"""Transformers4Rec adapters (needs the `merlin` extra). The core package never imports this module."""
from merlin_longseq.t4r.din import DINBlock
from merlin_longseq.t4r.hstu import HSTUBlock, hstu_config_from
from merlin_longseq.t4r.longer import LONGERBlock
from merlin_longseq.t4r.pooling import MeanPoolBlock
from merlin_longseq.t4r.request import (RequestBatchPadding, RequestBinaryClassificationTask, RequestBlock,
                                        RequestColumns, columns_and_sizes, request_dataloader)
from merlin_longseq.t4r.stca import STCABlock

__all__ = ["HSTUBlock", "hstu_config_from", "STCABlock", "LONGERBlock", "MeanPoolBlock", "DINBlock", "RequestBlock",
           "RequestColumns", "RequestBinaryClassificationTask", "RequestBatchPadding", "request_dataloader",
           "columns_and_sizes"]
