"""Declarative launcher and supervisor for distributed vLLM serving."""
