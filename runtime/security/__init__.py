"""Security of the serving endpoints: API keys (``keys.py``), TLS (``tls.py``) and their config
(``config.py``). Transport-free except ``tls.py``, which builds gRPC credentials and SSL contexts."""
