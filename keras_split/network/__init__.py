"""Split learning over gRPC: the server, its sessions and authentication, the
client's transport and `SplitClient`, protobuf conversion of the step's
messages, and development certificates.

The wire contract itself (protobuf, codecs, tensor checks, RPC policy) lives in
`keras_split_wire`, shared with the device runtime. This layer reaches roles
through the typed protocols in `keras_split.roles` and never imports a
configuration.
"""
