"""Transformers4Rec adapters (needs the `merlin` extra). The core package never imports this module."""
from merlin_longseq.t4r.hstu import HSTUBlock, hstu_config_from
from merlin_longseq.t4r.stca import RequestBinaryClassificationTask, RequestColumns, STCABlock, request_dataloader

__all__ = ["HSTUBlock", "hstu_config_from", "STCABlock", "RequestBinaryClassificationTask", "RequestColumns",
           "request_dataloader"]
