"""Graph analysis of a model, below the axes that use it and the exports built on it.

* :mod:`.coupling`: output channels that can only be pruned together (torch-pruning's dependency graph),
  and attention heads as such groups; used by the channel pattern's coupled units (:mod:`ptsparse.coupled`),
  the ``knapsack`` allocation and channel removal.
* :mod:`.cost`: the cost model (parameters, MACs, latency) and the warnings where zeros buy no speed; used
  by the knapsack's budgets, the report of a run and the export benchmarks.
* :mod:`.calls`: Linear layers that their parent applies through ``F.linear`` (torchvision's Swin attention), run
  as calls of the layer so that hooks on it see them; used wherever layers are observed by hooks (input
  statistics, MAC counts, the knapsack's trace, ``sparsify``'s probe).
* :mod:`.outputs`: the output layers (whose channels are the classes), found on the autograd graph; used by
  ``sparsify`` (they are never channel-pruned) and channel removal.
"""
