"""``vlp serve``: an OpenAI-compatible chat server for an export on Ray Serve (docs/serving.md, "vlp serve").

config (ServeConfig, pure) -> protocol (OpenAI requests, errors, responses; pure) + media (bounded fetching) ->
stream (detokenising, stop strings; pure) -> engine (the model on a replica; no Ray) -> app (the Serve
deployment, ``build`` for ``serve run``/``serve deploy``, ``run_serve`` for ``vlp serve``). Importing this package
imports neither Ray nor torch.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
