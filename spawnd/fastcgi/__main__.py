"""``python -m spawnd.fastcgi ADDRESS [URI] ...``: the same as spawnd.fastcgi.client."""
import sys

from .client import main

sys.exit(main(prog="python -m spawnd.fastcgi"))
