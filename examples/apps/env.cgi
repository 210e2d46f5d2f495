#!/bin/sh
# A CGI script for fcgiwrap: prints what the web server passed (same output as env.php).
printf 'Content-Type: text/plain\r\n\r\n'
for name in REQUEST_METHOD SCRIPT_NAME PATH_INFO QUERY_STRING HTTP_X_SPAWND_TEST \
            CONTENT_LENGTH; do
    eval "value=\${$name-}"
    printf '%s=%s\n' "$name" "$value"
done
printf 'FILE=%s\n' "$0"
printf 'body='
# Read exactly CONTENT_LENGTH bytes: stdin is not guaranteed to end after the body.
if [ -n "${CONTENT_LENGTH-}" ] && [ "$CONTENT_LENGTH" -gt 0 ]; then
    head -c "$CONTENT_LENGTH"
fi
