"""Runners: the ways to execute a net's plan, behind one small interface (``Runner``).

- ``EagerRunner`` (``eager.py``): Caffe's layer-by-layer ``ForwardFromTo``/``BackwardFromTo``;
- ``InferenceRunner`` (``inference.py``): the eager runner, whose whole passes of a net that
  computes no gradient run on the CPU as an inference program (packed oneDNN convolutions with
  the in-place BatchNorm/Scale/ReLU after them folded in); the net's default;
- ``DebugRunner`` (``debug.py``): the same with pycaffe's per-layer callbacks and Caffe's
  ``debug_info`` logs;
- ``CompiledRunner`` (``compiled.py``): ``torch.compile`` of the computing layers (opt-in);
- ``GraphRunner`` (``cuda_graph.py``): passes replayed from CUDA graphs (opt-in, one GPU).

Each owns its mode (autocast, label checks, capture) and works on the ``RunState`` it is given
(the plan, the device, what the last pass left); none sees the ``Net``, which picks one per pass
in ``Net._runner``.
"""

from caffe_compat.runners.base import PendingLoss, Runner, RunState
from caffe_compat.runners.compiled import CompiledRunner
from caffe_compat.runners.debug import DebugRunner
from caffe_compat.runners.eager import EagerRunner
from caffe_compat.runners.inference import InferenceRunner

__all__ = ["Runner", "RunState", "PendingLoss", "EagerRunner", "InferenceRunner", "DebugRunner", "CompiledRunner"]
