/* smtp_tls_source: many STARTTLS SMTP sessions at once from one thread, for benchmarks.
 *
 * Usage: smtp_tls_source PORT CAFILE CONNECTIONS PER_CONNECTION CONCURRENCY SIZE [IDLE-SECONDS]
 *
 * Opens CONNECTIONS connections to 127.0.0.1:PORT, CONCURRENCY at a time; on each: EHLO,
 * STARTTLS, a full TLS handshake (OpenSSL, TLS 1.2 or later, the server's certificate
 * verified against CAFILE and its subjectAltName against the address 127.0.0.1, no session
 * resumption), EHLO again, PER_CONNECTION messages of SIZE octets (MAIL FROM, RCPT TO, DATA:
 * each command waits for its reply, as smtplib does), QUIT. It prints "ready", waits for a
 * line on standard input (so several client processes start at the same moment), runs, and
 * prints "done FAILURES MESSAGES FIRST-ERROR": the connections that failed (an unexpected
 * reply, a refused handshake, no progress for IDLE-SECONDS, 120 by default), the messages the server accepted with
 * a 250, and the first error's text ("-" if none).
 *
 * Why it exists: tools/bench_tls_peers.py's Python client spends as much CPU per message as
 * the servers it measures, so on 2 cores it, not the servers, sets the rates. Postfix's
 * smtp-source has no TLS; Debian's postal offers only anonymous Diffie-Hellman (no
 * certificate), which no server under test accepts. One epoll loop with non-blocking OpenSSL
 * keeps the client's share small. tools/bench_tls_peers.py builds it at run time (cc, libssl).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>


enum state { CONNECTING, GREETING, EHLO, STARTTLS, HANDSHAKE, EHLO_TLS, MAIL, RCPT, DATA, BODY, QUIT };
static const char *const names[] = {"connect", "greeting", "EHLO", "STARTTLS", "handshake", "EHLO after STARTTLS",
                                    "MAIL", "RCPT", "DATA", "message", "QUIT"};
static const int expected[] = {0, 220, 250, 220, 0, 250, 250, 250, 354, 250, 221};

struct conn {
    int fd;
    SSL *ssl;
    enum state state;
    int messages;             /* accepted on this connection */
    uint32_t events;          /* what epoll watches for now */
    const char *out;          /* pending output and how much of it is written */
    size_t out_len, out_done;
    size_t in_len;
    double last;              /* last progress, for IDLE_LIMIT */
    int slot;                 /* its index in open_conns */
    char in[4096];
};

static SSL_CTX *ctx;
static struct conn **open_conns; /* the connections under way, for the idle sweep */
static int epfd, port, per_connection, failures, accepted, to_start, running;
static char *body, mail_from[128], first_error[256];
static size_t body_len;
static double idle_limit = 120.0; /* seconds without progress before a connection counts as failed */
static const char ehlo[] = "EHLO client.test\r\n", starttls[] = "STARTTLS\r\n", rcpt[] = "RCPT TO:<someone@example.test>\r\n",
                  data[] = "DATA\r\n", quit[] = "QUIT\r\n";

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void start_one(void);

static void finish(struct conn *c, const char *format, ...) {
    if (format) {
        failures++;
        if (!first_error[0]) {
            va_list args;
            va_start(args, format);
            int n = snprintf(first_error, sizeof first_error, "%s: ", names[c->state]);
            vsnprintf(first_error + n, sizeof first_error - n, format, args);
            va_end(args);
            for (char *p = first_error; *p; p++)
                if (*p == '\r' || *p == '\n') *p = ' ';
        }
    }
    if (c->ssl) SSL_free(c->ssl);
    if (c->fd >= 0) close(c->fd); /* also takes it out of the epoll set */
    open_conns[c->slot] = open_conns[--running];
    open_conns[c->slot]->slot = c->slot;
    free(c);
    if (to_start > 0) start_one();
}

static int watch(struct conn *c, uint32_t events) {
    if (c->events == events) return 0;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    c->events = events;
    return epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Write what is pending: 1 when all is written, 0 when the socket is full (EPOLLOUT is watched), -1 on error
 * (the connection is finished). */
static int flush(struct conn *c) {
    while (c->out_done < c->out_len) {
        const char *from = c->out + c->out_done;
        size_t left = c->out_len - c->out_done;
        ssize_t n;
        if (c->ssl) {
            ERR_clear_error();
            n = SSL_write(c->ssl, from, (int)left);
            if (n <= 0) {
                int error = SSL_get_error(c->ssl, (int)n);
                if (error == SSL_ERROR_WANT_WRITE || error == SSL_ERROR_WANT_READ) {
                    watch(c, EPOLLIN | EPOLLOUT);
                    return 0;
                }
                finish(c, "TLS write failed (%d)", error);
                return -1;
            }
        } else {
            n = send(c->fd, from, left, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    watch(c, EPOLLIN | EPOLLOUT);
                    return 0;
                }
                finish(c, "write failed: %s", strerror(errno));
                return -1;
            }
        }
        c->out_done += (size_t)n;
    }
    watch(c, EPOLLIN);
    return 1;
}

static int say(struct conn *c, enum state next, const char *text, size_t len) {
    c->state = next;
    c->out = text;
    c->out_len = len;
    c->out_done = 0;
    return flush(c);
}

/* Go on with the handshake, then EHLO: -1 when the connection failed (and is gone), else 0. */
static int handshake(struct conn *c) {
    ERR_clear_error();
    int result = SSL_do_handshake(c->ssl);
    if (result == 1) return say(c, EHLO_TLS, ehlo, sizeof ehlo - 1) < 0 ? -1 : 0;
    int error = SSL_get_error(c->ssl, result);
    if (error == SSL_ERROR_WANT_READ) {
        watch(c, EPOLLIN);
        return 0;
    }
    if (error == SSL_ERROR_WANT_WRITE) {
        watch(c, EPOLLIN | EPOLLOUT);
        return 0;
    }
    long verify = SSL_get_verify_result(c->ssl);
    char reason[160];
    ERR_error_string_n(ERR_peek_error(), reason, sizeof reason);
    finish(c, "TLS handshake failed: %s (certificate: %s)", reason, X509_verify_cert_error_string(verify));
    return -1;
}

/* A complete reply with this code arrived: check it, say what comes next. 0 when the connection goes on. */
static int answer(struct conn *c, int code, const char *line) {
    if (code != expected[c->state]) {
        finish(c, "%s", line);
        return -1;
    }
    switch (c->state) {
    case GREETING:
        return say(c, EHLO, ehlo, sizeof ehlo - 1) < 0 ? -1 : 0;
    case EHLO:
        return say(c, STARTTLS, starttls, sizeof starttls - 1) < 0 ? -1 : 0;
    case STARTTLS:
        if (c->in_len) {
            finish(c, "data after the 220 to STARTTLS");
            return -1;
        }
        c->state = HANDSHAKE;
        c->ssl = SSL_new(ctx);
        SSL_set_fd(c->ssl, c->fd);
        SSL_set_connect_state(c->ssl);
        /* Verified as smtplib connecting to 127.0.0.1 does: the address, in the subjectAltName, no SNI. */
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), "127.0.0.1");
        return handshake(c);
    case EHLO_TLS:
        return say(c, MAIL, mail_from, strlen(mail_from)) < 0 ? -1 : 0;
    case MAIL:
        return say(c, RCPT, rcpt, sizeof rcpt - 1) < 0 ? -1 : 0;
    case RCPT:
        return say(c, DATA, data, sizeof data - 1) < 0 ? -1 : 0;
    case DATA:
        return say(c, BODY, body, body_len) < 0 ? -1 : 0;
    case BODY:
        accepted++;
        if (++c->messages < per_connection) return say(c, MAIL, mail_from, strlen(mail_from)) < 0 ? -1 : 0;
        return say(c, QUIT, quit, sizeof quit - 1) < 0 ? -1 : 0;
    case QUIT:
        finish(c, NULL);
        return -1;
    default:
        finish(c, "a reply out of turn: %s", line);
        return -1;
    }
}

/* Read what arrived and act on each complete reply (the last line of one has a space after its code). */
static void receive(struct conn *c) {
    for (;;) {
        if (c->in_len == sizeof c->in) {
            finish(c, "a reply longer than %zu octets", sizeof c->in);
            return;
        }
        ssize_t n;
        if (c->ssl) {
            ERR_clear_error();
            n = SSL_read(c->ssl, c->in + c->in_len, (int)(sizeof c->in - c->in_len));
            if (n <= 0) {
                int error = SSL_get_error(c->ssl, (int)n);
                if (error == SSL_ERROR_WANT_READ) return;
                if (error == SSL_ERROR_WANT_WRITE) {
                    watch(c, EPOLLIN | EPOLLOUT);
                    return;
                }
                finish(c, error == SSL_ERROR_ZERO_RETURN ? "the server closed TLS" : "TLS read failed (%d)", error);
                return;
            }
        } else {
            n = recv(c->fd, c->in + c->in_len, sizeof c->in - c->in_len, 0);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
            if (n <= 0) {
                finish(c, n ? "read failed: %s" : "the server closed the connection", strerror(errno));
                return;
            }
        }
        c->in_len += (size_t)n;
        c->last = now();
        char *line = c->in, *end;
        while ((end = memchr(line, '\n', c->in_len - (size_t)(line - c->in)))) {
            char *next = end + 1;
            if (end - line >= 3 && (end - line == 3 || line[3] != '-')) {
                *end = '\0';
                int code = atoi(line);
                /* Replies are not pipelined: a complete one is the last thing in the buffer. */
                c->in_len -= (size_t)(next - c->in);
                memmove(c->in, next, c->in_len);
                if (answer(c, code, line) < 0 || c->state == HANDSHAKE) return; /* the handshake reads now */
                line = c->in;
                continue;
            }
            line = next;
        }
    }
}

static void event(struct conn *c, uint32_t events) {
    if (c->state == CONNECTING) {
        int error = 0;
        socklen_t len = sizeof error;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &len);
        if (error) {
            finish(c, "%s", strerror(error));
            return;
        }
        c->state = GREETING;
        c->last = now();
        watch(c, EPOLLIN);
        return;
    }
    if (c->state == HANDSHAKE) {
        c->last = now();
        handshake(c);
        return;
    }
    if ((events & EPOLLOUT) && c->out_done < c->out_len) {
        c->last = now();
        if (flush(c) < 0) return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) receive(c);
}

static void start_one(void) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    struct conn *c = calloc(1, sizeof *c);
    to_start--;
    c->slot = running;
    open_conns[running++] = c;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->last = now();
    c->events = EPOLLOUT;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (c->fd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        finish(c, "socket: %s", strerror(errno));
        return;
    }
    if (connect(c->fd, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS) finish(c, "%s", strerror(errno));
}

int main(int argc, char **argv) {
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: %s PORT CAFILE CONNECTIONS PER_CONNECTION CONCURRENCY SIZE [IDLE-SECONDS]\n", argv[0]);
        return 2;
    }
    port = atoi(argv[1]);
    int connections = atoi(argv[3]), concurrency = atoi(argv[5]), size = atoi(argv[6]);
    per_connection = atoi(argv[4]);
    if (argc == 8) idle_limit = atof(argv[7]);
    if (idle_limit <= 0 || port <= 0 || connections < 1 || per_connection < 1 || concurrency < 1 || size < 0) {
        fprintf(stderr, "%s: bad numbers\n", argv[0]);
        return 2;
    }
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (SSL_CTX_load_verify_locations(ctx, argv[2], NULL) != 1) {
        fprintf(stderr, "%s: cannot load %s\n", argv[0], argv[2]);
        return 2;
    }
    /* The message as tools/bench_tls_peers.py's Python client sends it, with the ending dot. */
    int lines = size / 78 > 0 ? size / 78 : 1;
    static const char head[] = "Subject: bench\r\n\r\n";
    body_len = sizeof head - 1 + (size_t)lines * 78 + 3;
    body = malloc(body_len);
    memcpy(body, head, sizeof head - 1);
    for (int i = 0; i < lines; i++) {
        char *line = body + sizeof head - 1 + (size_t)i * 78;
        memset(line, 'x', 76);
        memcpy(line + 76, "\r\n", 2);
    }
    memcpy(body + body_len - 3, ".\r\n", 3);
    snprintf(mail_from, sizeof mail_from, "MAIL FROM:<sender@client.test> SIZE=%zu\r\n", body_len - 3);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    open_conns = calloc((size_t)concurrency, sizeof *open_conns);

    printf("ready\n");
    fflush(stdout);
    char go[16];
    if (!fgets(go, sizeof go, stdin)) return 1;

    to_start = connections;
    while (to_start > 0 && running < concurrency) start_one();
    struct epoll_event events[256];
    double checked = now();
    while (running > 0) {
        int n = epoll_wait(epfd, events, 256, 1000);
        for (int i = 0; i < n; i++) event(events[i].data.ptr, events[i].events);
        double t = now();
        if (t - checked >= 1.0) {
            checked = t;
            /* Backwards: finish() moves the last connection into the freed slot, one already seen. */
            for (int i = running - 1; i >= 0; i--)
                if (i < running && t - open_conns[i]->last > idle_limit)
                    finish(open_conns[i], "no progress for %g s", idle_limit);
        }
    }
    printf("done %d %d %s\n", failures, accepted, first_error[0] ? first_error : "-");
    fflush(stdout);
    return 0;
}
