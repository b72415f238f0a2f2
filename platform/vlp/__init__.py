"""vlp: train Valley/LLaVA-family video-language models at cluster scale.

The library lives here; thin entry points for ``ray job submit`` live in ``jobs/``.
"""

__version__ = "0.1.0"
