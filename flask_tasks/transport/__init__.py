"""Message transports (kombu brokers) shipped with flask_tasks."""
