"""FastCGI 1.0, sans-IO (protocol.py) plus a small blocking client (client.py)."""
