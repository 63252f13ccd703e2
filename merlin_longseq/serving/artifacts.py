"""A served model's artifact files (no Merlin import: the model-only Triton model reads them too).

    merlin_longseq_model.json   the registry's description of the model (architecture + config)
    merlin_longseq_model.pt     its state dict (torch.save; loaded weights_only, strict, finite)
    merlin_longseq_items.npy    optional: raw item id of every encoded id (top-k decoding)
Each file's sha256 is recorded at export and verified before the server reads it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import torch

from merlin_longseq import registry

CONFIG_FILE = "merlin_longseq_model.json"
WEIGHTS_FILE = "merlin_longseq_model.pt"
VOCABULARY_FILE = "merlin_longseq_items.npy"  # raw item id of every encoded id (top-k decoding)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_artifacts(artifact_path: str, checksums: dict) -> None:
    """Every artifact file exists and has the checksum recorded at export; ValueError naming the file if not."""
    for name, expected in checksums.items():
        path = os.path.join(artifact_path, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the repository is incomplete; export it again")
        with open(path, "rb") as f:
            if _sha256(f.read()) != expected:
                raise ValueError(f"{path} does not match the checksum recorded at export (damaged or replaced); "
                                 "export the model again")


def load_model(artifact_path: str, checksums: dict | None = None) -> torch.nn.Module:
    """The served model from an artifact folder: JSON description + state dict (weights_only, strict, finite).

    checksums: {file name: sha256} recorded at export; every file is verified before it is read.
    """
    if checksums:
        verify_artifacts(artifact_path, checksums)
    with open(os.path.join(artifact_path, CONFIG_FILE), encoding="utf-8") as f:
        description = json.load(f)
    model = registry.model_from_dict(description)
    weights = os.path.join(artifact_path, WEIGHTS_FILE)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    bad = [name for name, value in state.items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:
        raise ValueError(f"{weights} holds non-finite values (NaN / inf) in {bad[:5]}: refusing to serve it")
    return model.eval()


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def model_files(model: torch.nn.Module) -> dict[str, bytes]:
    """{file name: bytes} of the model's description and weights (what load_model reads back)."""
    description = registry.model_to_dict(model)
    return {CONFIG_FILE: json.dumps(description, indent=2).encode(),
            WEIGHTS_FILE: _torch_bytes({k: v.detach().cpu() for k, v in model.state_dict().items()})}


def write_files(folder: str, files: dict[str, bytes]) -> dict[str, str]:
    """Write the files into folder; their {name: sha256}."""
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return {name: _sha256(data) for name, data in files.items()}
