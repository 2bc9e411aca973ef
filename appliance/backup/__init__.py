"""Backups of a device (``appliance backup`` / ``restore``) and of the hub.

One archive format (:mod:`.archive`): a tar file with a versioned header, a manifest
naming every member with its size and SHA-256, authenticated with a key derived from a
passphrase or a key file, and the secret members encrypted with AES-256-GCM. What goes
into a device's archive and where a restore puts it is :mod:`.device`; the hub's is
:mod:`.hubside`; :mod:`.hubclient` moves a device's archive to and from the hub.
"""
