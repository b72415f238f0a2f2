"""Evaluation. ``synthetic`` scores the synthetic world's questions (colour, shape, direction) on a held-out
feature set; ``videoqa`` (open-ended QA: MSRVTT-QA, MSVD-QA, ActivityNet-QA files, exact match + Video-ChatGPT's
predictions file) and ``mcq`` (multiple choice by log-likelihood: Video-MME, MVBench files) ask a benchmark's
questions about videos decoded online with :class:`vlp.chat.ChatSession`; ``common`` holds what those two share
(question files, video lookup, outcomes, results.json/results.md) and the generation read-ahead every task uses
(``LENGTH_GROUPS``). May import chat, formats, models, data; never train or precompute."""
