"""The HTTP API: a FastAPI app served as the Ray Serve ingress deployment."""
