"""The pure core: return codes, the reply table, addresses, wire framing, the SMTP state machine,
PROXY headers, header parsing. No I/O, no gevent, stdlib only (tests/unit/test_layers.py)."""
