"""The worker: a supervisor process that consumes messages and a pool that runs them.

``worker.main`` holds :class:`~flask_tasks.worker.main.Worker` (the consume
loop, acks, signals, shutdown), ``worker.pools`` the prefork / threads / solo
pools, ``worker.executor`` the job a pool runs: decode one message and run it
with :func:`flask_tasks.trace.trace_task`.
"""
