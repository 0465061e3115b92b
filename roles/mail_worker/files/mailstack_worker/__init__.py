"""mailstack's mail worker: jobs from RabbitMQ rendered and sent through the relays' VIP, each once."""
