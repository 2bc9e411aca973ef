"""Signed model rollouts from the hub to the fleet, in waves gated on device health.

:mod:`.artifacts` holds the content-addressed store of published model versions,
:mod:`.plan` the waves, :mod:`.service` the rules and the unit that moves rollouts along,
:mod:`.api` the REST routes, :mod:`.upload` publishing over HTTP; the signing key is in
``appliance.security.signing``. Devices pull what they are asked for through their
ingest answers (``appliance.ops.updater``).
"""
