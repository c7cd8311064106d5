"""Message transports (kombu brokers) shipped with flask_tasks, and what a worker needs of one.

``transport.base`` declares :class:`~flask_tasks.transport.base.WorkerChannel`,
the seam between the worker and a broker; ``transport.connect`` makes broker
connections and masks URLs; ``transport.redis`` and ``transport.embedded``
are the transports (``transport.polling``: adaptive polling for the embedded
one). Never imports Flask.
"""
