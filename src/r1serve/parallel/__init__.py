"""The process groups and collectives the parallel layers call; nothing else.

Layers of a sharded model hold 1/size of the heads, MLP columns, vocabulary rows or experts
and say where their partial results are summed (tensor_parallel.TensorParallel); a rank
joins its group with process_group.init_group. Who runs the ranks, and how steps reach
them, is the executor's (r1serve.executor), a floor above the models.
"""
