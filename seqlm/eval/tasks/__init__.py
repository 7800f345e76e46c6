"""Long-context tasks: seeded generators of training data (token labels, -100 elsewhere) and
checkpoint evaluators writing JSON + PNG.

- :mod:`.mqar` — multi-query associative recall (Zoology), synthetic tokens.
- :mod:`.passkey` — pass key in repeated filler; length x depth heatmap.
- :mod:`.needle` — needle in a real-text haystack (Tiny Shakespeare); length x depth heatmap.
- :mod:`.phonebook` — name -> number lookup; accuracy vs list length.
- :mod:`.train_task` — train fresh 2-layer models on a task with an lr sweep (Zoology's recipe).
- :mod:`.cli` — ``seqlm eval mqar|passkey|needle|phonebook``.
"""
