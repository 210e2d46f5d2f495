<?php
// Shows what the web server passed: the CGI variables that decide routing, one test
// header, this file's path and the request body. Same output as env.cgi and envapp.py.
header("Content-Type: text/plain");
foreach (["REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
          "HTTP_X_SPAWND_TEST", "CONTENT_LENGTH"] as $name) {
    echo $name, "=", $_SERVER[$name] ?? "", "\n";
}
echo "FILE=", __FILE__, "\n";
echo "body=", file_get_contents("php://input");
