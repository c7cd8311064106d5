"""The worker: a supervisor process that consumes messages and a pool that runs them.

``worker.main`` holds :class:`~flask_tasks.worker.main.Worker` (the consume
loop, acks, signals, shutdown), ``worker.pools`` the prefork / threads / solo
pools, ``worker.executor`` what happens to one message.
"""
