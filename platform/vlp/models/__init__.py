"""The model: typed parts chosen by ``type`` (``poolers``, ``connectors``, ``towers``, ``audio_towers``, on the
machinery in ``parts``), the ``videollm`` that splices their visual tokens into a causal LM (``generation``: its token
rule and batched, left-padded decoding), and model loading by path, hub id
or ``preset:NAME`` with the tiny presets tests and the demo use (``presets``).
May import: config, errors, registry, data (conversation ids, preprocessing). Never formats, precompute, train."""
