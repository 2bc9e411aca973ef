#!/bin/sh
# Maps balena's device variables onto the appliance's configuration, unless the fleet or
# device variables set APPLIANCE_* themselves (those always win), then runs the command.
set -eu

# The device id: balena's UUID (lower-case hex, a valid [device] id), stable across updates.
if [ -z "${APPLIANCE_DEVICE__ID:-}" ] && [ -n "${BALENA_DEVICE_UUID:-}" ]; then
    APPLIANCE_DEVICE__ID=$(printf '%s' "$BALENA_DEVICE_UUID" | tr 'A-Z' 'a-z' | cut -c1-32)
    export APPLIANCE_DEVICE__ID
fi
# The name shown on the hub and in discovery: the device's name in the dashboard.
if [ -z "${APPLIANCE_DEVICE__NAME:-}" ] && [ -n "${BALENA_DEVICE_NAME_AT_INIT:-}" ]; then
    export APPLIANCE_DEVICE__NAME="$BALENA_DEVICE_NAME_AT_INIT"
fi

# First start: seed the models volume with the default models shipped in the package.
models=${APPLIANCE_MODELS__DIR:-}
if [ -n "$models" ] && [ -z "$(ls -A "$models" 2>/dev/null)" ]; then
    mkdir -p "$models"
    defaults=$(python3 -c 'from appliance.config import default_models_dir; print(default_models_dir())')
    cp -R "$defaults"/. "$models"/
fi
mkdir -p "${STATE_DIRECTORY:-/data/state}"

exec "$@"
