"""Evaluation on held-out feature sets: ``synthetic`` scores the synthetic world's questions (colour, shape,
direction). May import formats, models, data; never train or precompute."""
