"""Overrides the tests share for short runs of the shipped `tiny` experiment."""

# On CPU: no evaluation, no tracker, one decode thread, a line per step, a warm-up that ends within a short run.
QUICK = [
    "data.eval=null",
    "tracking.mode=disabled",
    "data.num_workers=1",
    "training.warmup_steps=2",
    "training.logging_steps=1",
]
