"""Data side, plain functions without Ray: the general sample (``sample``: text + 0..N media items parsed from a
WebDataset sample's members), the streaming tar reader (``tario``), media sniffing/decoding/frame sampling
(``media``), CLIP preprocessing (``preprocess``) and conversation templates with label masks (``conversation``).
May import: config, errors, registry. Never models, formats, precompute, train."""
