"""Model loading (by path, hub id or ``preset:NAME``) and the tiny presets used by tests and the demo."""
