"""Distillation (MOHAWK, Bick et al. 2024; Mamba-in-the-Llama, Wang et al. 2024): a trained
teacher into a Mamba-2 / Mamba / H3 / hybrid (or any seqlm) student, as objectives for the
training loop. ``seqlm distill -c configs/distill/X.yaml``.

    mixers.py      hooks: per-layer trace, attention probabilities, materialised mixing matrices
    init.py        the student's config and weights from the teacher (attention -> SSM mappings)
    objectives.py  the stage losses (orient, align, logits) as training-loop objectives
    runner.py      the stages in order, resume, the final report
    cli.py         ``seqlm distill``
(Submodules are imported on use: the hooks and mappings need neither train nor io.)"""
