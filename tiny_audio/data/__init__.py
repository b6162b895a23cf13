"""Streaming speech data: sources -> seeded order -> filters -> length buckets -> prefetched batches.

Files, in the order data flows through them:
- `sources.py`  open a Hub data set / local shards / folder with `datasets` (streaming); raw rows by shard and row
- `order.py`    the seeded, resumable order: shard permutations, block shuffles, source interleaving, cursors
- `filters.py`  transcript normalisation and the drop reasons (empty text, label budget, length, silence, NaN)
- `audio.py`    header probe and decode (soundfile) + resampling to 16 kHz (soxr)
- `samples.py`  a sample's plan-time (`admit`) and decode-time (`finish`) checks
- `batching.py` `Batch`, length bucketing, collation
- `planner.py`  interleave + rank split + windows of bucketed batches, as a function of a small position
- `pipeline.py` `TrainStream` (prefetch threads, state_dict, stats) and `build_train_stream`
- `eval.py`     `build_eval_set`: a seeded sample of the eval split, fixed for the run
"""

from tiny_audio.data.batching import Batch
from tiny_audio.data.eval import EvalSet, build_eval_set
from tiny_audio.data.filters import DropReason
from tiny_audio.data.pipeline import TrainStream, build_train_stream

__all__ = ["Batch", "DropReason", "EvalSet", "TrainStream", "build_eval_set", "build_train_stream"]
