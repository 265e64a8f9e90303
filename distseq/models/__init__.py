"""Models: the registry's front door and shared pieces (``base``), recurrent networks (``recurrent``), the
transformer encoder (``encoder``), the causal decoder (``decoder``) and FLOPs per token (``flops``).

    from distseq.models import build_model, register_model
"""

from distseq.models.base import build_model, register_model

__all__ = ["build_model", "register_model"]
