"""Signed model rollouts from the hub to the fleet, in waves gated on device health.

:mod:`.signing` holds the hub's Ed25519 key, :mod:`.artifacts` the content-addressed
store of published model versions, :mod:`.plan` the waves, :mod:`.engine` the unit that
moves rollouts along, :mod:`.api` the REST routes, :mod:`.upload` publishing over HTTP. Devices pull what they are asked for
through their ingest answers (``appliance.ops.updater``).
"""
