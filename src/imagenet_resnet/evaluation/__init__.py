"""Evaluation: the loop that training's per-epoch validation and the `evaluate` command share (loop), the
command itself (command), and the figures it reports (metrics: ReaL, calibration, per class, the published
figures beside ours)."""
