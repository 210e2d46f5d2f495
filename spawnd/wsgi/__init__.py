"""spawnd-wsgi: the WSGI-to-FastCGI runner (see docs/spawnd-wsgi.md)."""
