"""A model folder in MLflow's format (``MLmodel`` plus its PyTorch flavor's data), read with torch alone.

The coordinator logs models with MLflow, which saves a torch-exported program (``data/model.pt2``).
A site loads the same bytes without MLflow: it reads the flavor's data folder from ``MLmodel`` and
``torch.export.load``s the program, exactly as ``mlflow.pytorch.load_model`` does for that format.
A pickled model (``model.pth``) is refused: unpickling runs code, and Quorum never writes one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from quorum.configs.errors import ToolError

EXPORTED_FILE = "model.pt2"


def load_model_folder(files: Path) -> nn.Module:
    """The torch module in a (verified) MLflow model folder."""
    try:
        mlmodel = yaml.safe_load((files / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ToolError(f"cannot read the model description {files / 'MLmodel'}: {exc}", fix=_FIX) from None
    flavor = (mlmodel.get("flavors") or {}).get("pytorch") if isinstance(mlmodel, dict) else None
    if not isinstance(flavor, dict):
        raise ToolError(f"{files} holds no PyTorch model (no pytorch flavor in its MLmodel)", fix=_FIX)
    exported = files / str(flavor.get("model_data") or "data") / EXPORTED_FILE
    if not exported.is_file():
        raise ToolError(f"{files} holds no exported PyTorch program ({exported.name})", fix=_FIX)
    module: nn.Module = torch.export.load(str(exported)).module()
    return module


_FIX = "promote the model again with this version of Quorum (it saves a torch-exported program)"
