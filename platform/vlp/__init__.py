"""vlp: train Valley/LLaVA-family video-language models at cluster scale.

The library lives here; thin entry points for ``ray job submit`` live in ``jobs/``. Top-level modules: ``cli`` (the
``vlp`` command; its one handler prints every :class:`vlp.errors.UserError` in one line), ``errors``, ``config``
(typed configs, dotted overrides), ``registry``, ``storage`` (local/S3 files, atomic writes, append-only logs),
``runtime`` (Ray), ``chat``, ``infer``, ``inspect_``. Subpackages, each with what it may import in its docstring:
``data`` (samples, media, templates), ``models`` (parts and the VideoLLM), ``formats`` (what stages write and read),
``precompute``, ``train``, ``eval``, ``synth`` (the demo's synthetic world).
"""

__version__ = "0.1.0"
