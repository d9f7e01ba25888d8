"""The wire: typed records and their codec (:mod:`.protocol`, pure), and the ZeroMQ sockets
every peer uses (:mod:`.transport`).  docs/protocol.md is the same protocol in prose."""
