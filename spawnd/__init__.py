"""spawnd: a supervisor daemon for FastCGI back ends."""

__version__ = "0.1.0"
