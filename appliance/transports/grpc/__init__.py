"""The gRPC transport: the Open Inference Protocol v2 ``GRPCInferenceService``.

Optional (``pip install 'appliance[grpc]'``, ``[grpc] enabled = true``): nothing here is
imported unless the daemon serves gRPC. The servicer (``service.py``) translates messages and
maps errors to status codes in one place; ``server.py`` is the lifecycle unit.

The stubs are generated from ``grpc_service.proto`` and committed. They register the
protocol's own names (package ``inference``), as KServe's do, so they cannot share a process
with another copy of that protocol, such as ``tritonclient.grpc``'s: the daemon never
imports a client, and the tests talk to a daemon subprocess.
"""
