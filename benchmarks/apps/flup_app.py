"""benchapp under flup's threaded FastCGI WSGIServer, serving the socket on fd 0.

Started as ``spawn-fcgi -s SOCK -n -- PYTHON flup_app.py`` (spawn-fcgi binds the socket
and execs this with it on fd 0; flup uses fd 0 when no bindAddress is given).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flup.server.fcgi import WSGIServer  # noqa: E402

from benchapp import application  # noqa: E402

if __name__ == "__main__":
    sys.exit(WSGIServer(application).run())
