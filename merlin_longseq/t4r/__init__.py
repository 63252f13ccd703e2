"""Transformers4Rec adapters (needs the `merlin` extra). The core package never imports this module."""
from merlin_longseq.t4r.hstu import HSTUBlock, hstu_config_from

__all__ = ["HSTUBlock", "hstu_config_from"]
