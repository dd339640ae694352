"""The router: the policy core live, as an async HTTP reverse proxy in front of SGLang or vLLM servers.

Imports :mod:`scheduler` and :mod:`traces`, never :mod:`sim`.
"""

__all__: list[str] = []
