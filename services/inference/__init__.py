"""The inference deployment: the frozen model, a prefix cache and continuous batching of
many tenants' requests in the same forward passes."""
