"""The OpenAI-compatible HTTP frontend (see server.py)."""
