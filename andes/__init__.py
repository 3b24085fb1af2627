"""Andes Serve: QoE-aware LLM text streaming (the Andes scheduler, arXiv 2404.16283)."""

__version__ = "0.1.0"
