"""Wire formats shared by the transports and the hub, apart from any transport or model.

The Open Inference Protocol's tensor codecs (:mod:`.oip` for JSON, :mod:`.oip_msgpack` for
MessagePack and the binary tensor extension), the one strict JSON reader every transport
parses bodies with (:mod:`.strictjson`), and the DNS-SD contract between an announcing
appliance and the clients that find it (:mod:`.dnssd`). Nothing here imports a transport,
the core or a runtime.
"""
