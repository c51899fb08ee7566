"""The ranks that run the model, between the engine above and the models below.

    engine/     LLMEngine: scheduler, requests, speculation; calls its executor each step
    executor/   this package: the processes that run a model's ranks
        launch.py               the executor a configuration asks for
        executor.py             what rank 0 does with the others: agree on the load, share
                                the KV cache's size, broadcast steps, name a dead rank;
                                UniprocExecutor, for one rank
        worker.py               what every rank brings up: its shard, KV dtype and cache
        multiproc_executor.py   ranks 1..N-1 as processes of this node
        ray_executor.py         ranks 1..N-1 as actors of a Ray cluster
        worker_process.py       a rank other than 0 as a process: its Worker runs every step
        mtp_pass.py             DeepSeek's MTP layer as every rank runs it
        step_broadcast.py       the step's inputs from rank 0 to the others (gloo)
        step_inputs.py          a step's model inputs as lists, and the tensors built from them
        replica_group.py        DP attention: replicas whose MoE layers are one group
    models/     architectures and checkpoint loading
    parallel/   the process groups and collectives the layers call
"""
