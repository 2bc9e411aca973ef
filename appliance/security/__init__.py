"""Security built in: API keys and scopes, allow-lists and the Host check, rate limits, TLS,
log redaction and encryption at rest (docs/security.md).

Nothing here knows a wire protocol: the transports (``transports/http/security.py``, the
gRPC servicer) translate requests into the questions these modules answer.
"""
