"""A clear ``ImportError`` when an optional framework is missing or fails to import."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, package: str, integration: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # also e.g. timm's RuntimeError from a torchvision built for CUDA
        missing = isinstance(e, ImportError) and getattr(e, "name", None) in (package, module)
        cause = "" if missing else f" (importing {module} failed: {type(e).__name__}: {e})"
        raise ImportError(
            f"koala_func.integrations.{integration} requires {package}: "
            f'pip install {package} (or pip install "koala_func[integrations]"){cause}'
        ) from e
