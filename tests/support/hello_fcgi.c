/*
 * hello_fcgi: a tiny FastCGI responder on libfcgi, for tests and benchmarks.
 *
 * Accepts connections on the listening socket it finds on fd 0 (as spawn-fcgi, multiwatch
 * and spawnd hand it over) and answers every request with one deterministic line:
 *
 *     hello pid=<pid> n=<requests served by this process> method=<REQUEST_METHOD>
 *     query=<QUERY_STRING> body=<bytes of request body read>
 *
 * A query containing sleep_ms=<N> makes it wait N milliseconds before answering, so tests
 * can hold requests in flight. A query containing exit=<status> makes it answer, then exit
 * with that status (a child that dies on purpose).
 *
 * Build: gcc -O2 -Wall -o hello_fcgi hello_fcgi.c -lfcgi
 */
#include <fcgiapp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The integer value of "name=" in a query string, or -1 when absent. */
static long query_number(const char *query, const char *name)
{
    size_t len = strlen(name);
    const char *p = query;
    while (p && *p) {
        if (strncmp(p, name, len) == 0 && p[len] == '=')
            return strtol(p + len + 1, NULL, 10);
        p = strchr(p, '&');
        if (p)
            p++;
    }
    return -1;
}

int main(void)
{
    FCGX_Request req;
    unsigned long served = 0;
    char buf[8192];

    if (FCGX_Init() != 0 || FCGX_InitRequest(&req, 0, 0) != 0) {
        fprintf(stderr, "hello_fcgi: cannot initialise libfcgi\n");
        return 1;
    }
    while (FCGX_Accept_r(&req) >= 0) {
        const char *query = FCGX_GetParam("QUERY_STRING", req.envp);
        const char *method = FCGX_GetParam("REQUEST_METHOD", req.envp);
        long body = 0, n, sleep_ms, exit_status;

        if (!query)
            query = "";
        while ((n = FCGX_GetStr(buf, sizeof buf, req.in)) > 0)
            body += n;
        sleep_ms = query_number(query, "sleep_ms");
        if (sleep_ms > 0) {
            struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
        served++;
        FCGX_FPrintF(req.out,
                     "Content-Type: text/plain\r\n\r\n"
                     "hello pid=%ld n=%lu method=%s query=%s body=%ld\n",
                     (long)getpid(), served, method ? method : "", query, body);
        exit_status = query_number(query, "exit");
        FCGX_Finish_r(&req);
        if (exit_status >= 0)
            return (int)exit_status;
    }
    return 0;
}
