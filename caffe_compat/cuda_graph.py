"""Where CUDA graphs lived before the runners: ``caffe_compat.runners.cuda_graph``."""

from caffe_compat.runners.cuda_graph import GraphedPass, GraphRunner

__all__ = ["GraphRunner", "GraphedPass"]
