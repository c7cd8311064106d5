"""The worker: a supervisor process that consumes messages and a pool that runs them.

``worker.main`` holds :class:`~flask_tasks.worker.main.Worker`: start, the
consume loop, signals and shutdown. It composes the parts:
``worker.consumer`` (the broker side: check each message, settle it, keep
leases), ``worker.dispatch`` (buffer to pool: rate limits, hard time limits,
outcomes, redelivery and the poison cap), ``worker.revokes`` (revoked task
ids), ``worker.housekeeping`` (the loop's timers: due delayed messages, expired
results, dead letters), ``worker.pools`` and ``worker.prefork`` (the prefork / threads / solo
pools) and ``worker.executor`` (the job a pool runs: decode one message and
run it with :func:`flask_tasks.trace.trace_task`). What the worker needs from
a transport is :class:`flask_tasks.transport.base.WorkerChannel`.
"""
