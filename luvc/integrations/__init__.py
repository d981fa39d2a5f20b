"""Bridges to other tools; each module needs that tool installed (``luvc[eval]`` for lmms-eval)."""
