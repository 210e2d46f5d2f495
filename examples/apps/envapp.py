"""A WSGI application that shows what it was given (same output as env.php and env.cgi).

    spawnd-wsgi --chdir /srv/www envapp:application
"""

NAMES = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
         "HTTP_X_SPAWND_TEST", "CONTENT_LENGTH")


def application(environ, start_response):
    body = environ["wsgi.input"].read()
    lines = [f"{name}={environ.get(name, '')}\n" for name in NAMES]
    lines.append(f"FILE={__file__}\n")
    out = "".join(lines).encode("latin-1") + b"body=" + body
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(out)))])
    return [out]
