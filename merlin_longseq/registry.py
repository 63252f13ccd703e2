"""One registry of architectures: name -> config class, model class and what callers need to know.

Every caller that lets a user pick an architecture by name (the T4R blocks, the jobs, the CLI, serving,
TorchScript, distributed training) reads this table, so adding an architecture is one model file plus one
entry here.

Ranking architectures answer one protocol (the request core's RequestBatch feeds it):
    config: num_items, num_actions, num_users, uses_users, num_tasks, headless(), with_tasks(names)
    model:  encode_user(**batch.history) -> user state       (once per request: RLB, cacheable)
            candidate_hidden(state, cand_item_ids, cand_offsets) -> [C, hidden_dim]
            score_candidates(state, cand_item_ids, cand_offsets) -> logits [C, num_tasks]
            forward(**batch.model_inputs) -> logits;  hidden_dim;  limits (a RequestLimits)
Next-item architectures (HSTU) encode a history and score items by a weight-tied dot product.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field

RANKING, NEXT_ITEM = "ranking", "next_item"


@dataclass(frozen=True)
class Architecture:
    name: str
    kind: str  # RANKING | NEXT_ITEM
    module: str  # the one model file
    config: str  # config class name in that module
    model: str  # model class name in that module
    block: str  # Transformers4Rec block class name (merlin_longseq.t4r)
    summary: str
    traceable: bool = False  # TorchScript (torch.jit.trace + PredictPyTorch) supports it
    # the smallest sensible config fields besides the table sizes: smoke runs (--quick) and contract tests
    tiny: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def config_class(self):
        return getattr(importlib.import_module(self.module), self.config)

    @property
    def model_class(self):
        return getattr(importlib.import_module(self.module), self.model)


_ENTRIES = (
    Architecture("stca", RANKING, "merlin_longseq.models.stca", "STCAConfig", "STCAModel", "STCABlock",
                 "stacked target-to-history cross attention (RLB, length extrapolation)", traceable=True,
                 tiny=dict(d_model=8, n_heads=2, n_layers=1, mlp_dims=(8,))),
    Architecture("longer", RANKING, "merlin_longseq.models.longer", "LONGERConfig", "LONGERModel", "LONGERBlock",
                 "global tokens, token merge, hybrid attention, KV cache",
                 tiny=dict(token_dim=4, merge_size=2, n_heads=2, n_layers=2, num_recent_queries=2, head_hidden=8)),
    Architecture("mean-pool", RANKING, "merlin_longseq.models.pooling", "MeanPoolConfig", "MeanPoolModel",
                 "MeanPoolBlock", "mean of the history tokens (baseline)", tiny=dict(d_model=8, mlp_dims=(8,))),
    Architecture("din", RANKING, "merlin_longseq.models.din", "DINConfig", "DINModel", "DINBlock",
                 "DIN-style target attention pooling (baseline)",
                 tiny=dict(d_model=8, mlp_dims=(8,), attention_dims=(8,))),
    Architecture("ultra-hstu", RANKING, "merlin_longseq.models.ultra_hstu", "ULTRAHSTUConfig", "ULTRAHSTUModel",
                 "ULTRAHSTUBlock", "ULTRA-HSTU ranking: candidates as targets of one HSTU sequence, delta-query cache",
                 tiny=dict(d_model=8, n_heads=2, n_layers=2, max_seq_len=64, mlp_dims=(8,))),
    Architecture("hstu", NEXT_ITEM, "merlin_longseq.models.hstu", "HSTUConfig", "HSTUNextItemModel", "HSTUBlock",
                 "HSTU / ULTRA-HSTU pointwise attention, next-item",
                 tiny=dict(d_model=8, n_heads=2, n_layers=1, max_seq_len=32)),
    # the served form of a Transformers4Rec next-item model around HSTUBlock (t4r.hstu.next_item_servable)
    Architecture("hstu-t4r", NEXT_ITEM, "merlin_longseq.models.hstu", "HSTUConfig", "HSTUSequenceModel",
                 "HSTUBlock", "HSTU next-item model as trained in Transformers4Rec (served form)",
                 tiny=dict(d_model=8, n_heads=2, n_layers=1, max_seq_len=32)),
)
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in _ENTRIES}


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}") from None


def names(kind: str | None = None) -> tuple[str, ...]:
    """Registered names (of one kind), in registration order."""
    return tuple(a.name for a in _ENTRIES if kind is None or a.kind == kind)


def of_model(model) -> Architecture:
    """The architecture of a core model instance."""
    for arch in _ENTRIES:
        if type(model) is arch.model_class:
            return arch
    for arch in _ENTRIES:  # subclasses (DIN extends mean pooling): the most specific match was tried first
        if isinstance(model, arch.model_class):
            return arch
    raise ValueError(f"{type(model).__name__} is not a registered architecture's model; registered: "
                     + ", ".join(f"{a.name} ({a.model})" for a in _ENTRIES))


def model_to_dict(model) -> dict:
    """What rebuilds a model (weights aside), JSON-safe: architecture, config and constructor sizes."""
    arch = of_model(model)
    # next-item models keep sizes outside their config (HSTUNextItemModel(num_items, cfg, num_actions))
    sizes = model.constructor_args() if hasattr(model, "constructor_args") else {}
    return {"arch": arch.name, "config": config_to_dict(model.cfg), "sizes": sizes}


def model_from_dict(description: dict):
    """The model model_to_dict described, freshly initialised (load its state dict next)."""
    arch = get(description["arch"])
    cfg = config_from_dict(arch, description["config"])
    if hasattr(arch.model_class, "from_constructor_args"):
        return arch.model_class.from_constructor_args(cfg, description.get("sizes") or {})
    return arch.model_class(cfg)


def config_to_dict(cfg) -> dict:
    """A JSON-safe dict of a config (training-only objects such as the length sampler are dropped)."""
    values = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "length_sampler":
            continue  # training only: a served or reloaded model never samples
        values[f.name] = list(value) if isinstance(value, tuple) else value
    return values


def config_from_dict(arch: str | Architecture, values: dict):
    arch = get(arch) if isinstance(arch, str) else arch
    known = {f.name for f in dataclasses.fields(arch.config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{arch.name} config has no field(s) {unknown}")
    return arch.config_class(**values)


__all__ = ["ARCHITECTURES", "Architecture", "NEXT_ITEM", "RANKING", "config_from_dict", "config_to_dict", "get",
           "model_from_dict", "model_to_dict", "names", "of_model"]
