/*
 * npbench: target service and load generator for bench/bench.py (loopback only).
 *
 *   npbench target PORT THREADS
 *       One service for every test: a connection whose first byte is 'S' is a
 *       sink (counts every byte, writes "COUNT\n" at EOF and closes); any other
 *       connection is an echo. epoll, THREADS threads sharing the listener.
 *   npbench stream  PORT BYTES STREAMS DEADLINE_S      throughput into the sink
 *   npbench echo    PORT N DEADLINE_S                  1-byte round trips, one connection
 *   npbench connlat PORT N DEADLINE_S                  N sequential connect + 1-byte echo
 *   npbench conns   PORT N CONC DEADLINE_S HOLD        N connections (CONC at once), 1-byte
 *                                                      echo each; HOLD=1 keeps them open
 *                                                      until stdin closes
 *   npbench cps     PORT CONC SECONDS                  connect, 1-byte echo, close, in a loop
 *
 * Client modes print one JSON object on stdout (the "conns" mode with HOLD prints
 * it once every connection is set up, then waits). Source addresses of client
 * connections rotate over 127.0.0.2 .. 127.0.0.(1+NPB_SRC_IPS) (default 32; 0 = let
 * the kernel choose 127.0.0.1) so that TIME_WAIT sockets do not exhaust ports.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define BUFSZ (256 * 1024)

static int g_port;
static int g_src_ips = 32;
static unsigned g_src_next;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    printf("{\"ok\":false,\"error\":\"%s: %s\"}\n", what, strerror(errno));
    exit(2);
}

static double self_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

/* ------------------------------------------------------------------ statistics */

typedef struct { double *v; size_t n, cap; } samples_t;

static void add_sample(samples_t *s, double x) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1024;
        s->v = realloc(s->v, s->cap * sizeof(double));
        if (!s->v) die("realloc");
    }
    s->v[s->n++] = x;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* nearest-rank percentile of sorted samples */
static double pct(const samples_t *s, double p) {
    if (!s->n) return -1;
    size_t k = (size_t)(p * s->n + 0.999999999);
    if (k < 1) k = 1;
    if (k > s->n) k = s->n;
    return s->v[k - 1];
}

/* prints  "name":{"n":..,"min_us":..,...}  (values in microseconds) */
static void print_stats(const char *name, samples_t *s) {
    double sum = 0;
    qsort(s->v, s->n, sizeof(double), cmp_d);
    for (size_t i = 0; i < s->n; i++) sum += s->v[i];
    printf("\"%s\":{\"n\":%zu,\"min_us\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,"
           "\"max_us\":%.1f,\"mean_us\":%.1f}",
           name, s->n, s->n ? s->v[0] * 1e6 : -1, pct(s, .50) * 1e6, pct(s, .90) * 1e6, pct(s, .99) * 1e6,
           s->n ? s->v[s->n - 1] * 1e6 : -1, s->n ? sum / s->n * 1e6 : -1);
}

/* ------------------------------------------------------------------ sockets */

static struct sockaddr_in dst_addr(void) {
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(g_port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* new client socket bound to a rotating loopback source address */
static int client_socket(int nonblock) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (g_src_ips > 0) {
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(0x7f000002u + (__atomic_fetch_add(&g_src_next, 1, __ATOMIC_RELAXED) % g_src_ips));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { close(fd); return -1; }
    }
    return fd;
}

static void set_timeouts(int fd, double secs) {
    if (secs < 0.001) secs = 0.001;
    struct timeval tv = {(time_t)secs, (suseconds_t)((secs - (time_t)secs) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* blocking connect with a bounded wait */
static int connect_blocking(double timeout) {
    int fd = client_socket(0);
    if (fd < 0) return -1;
    set_timeouts(fd, timeout);
    struct sockaddr_in a = dst_addr();
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { int e = errno; close(fd); errno = e; return -1; }
    return fd;
}

/* ------------------------------------------------------------------ target service */

enum { M_NEW, M_ECHO, M_SINK };
typedef struct {
    int fd, mode;
    unsigned long long count;
    char *pend;          /* echo bytes not yet written */
    size_t plen, poff;
} tconn_t;

static int g_lfd;

static void tconn_close(int ep, tconn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pend);
    free(c);
}

/* a sink stream: blocking reads until EOF, then "COUNT\n" */
static void *sink_thread(void *arg) {
    tconn_t *c = arg;
    char *buf = malloc(BUFSZ);
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) & ~O_NONBLOCK);
    for (;;) {
        ssize_t r = read(c->fd, buf, BUFSZ);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) goto out;
        if (r == 0) break;
        c->count += (unsigned long long)r;
    }
    char line[32];
    int len = snprintf(line, sizeof line, "%llu\n", c->count);
    if (write(c->fd, line, (size_t)len) < 0) { /* peer gone */ }
out:
    close(c->fd);
    free(buf);
    free(c);
    return NULL;
}

static void *target_thread(void *arg) {
    (void)arg;
    char *buf = malloc(BUFSZ);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!buf || ep < 0) die("target init");
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, g_lfd, &ev) < 0) die("epoll_ctl listen");
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int i = 0; i < n; i++) {
            tconn_t *c = evs[i].data.ptr;
            if (!c) { /* listener */
                for (int k = 0; k < 64; k++) {
                    int fd = accept4(g_lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = c};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e2) < 0) { close(fd); free(c); }
                }
                continue;
            }
            if (c->pend) { /* writable: flush pending echo bytes */
                ssize_t w = write(c->fd, c->pend + c->poff, c->plen - c->poff);
                if (w < 0 && errno != EAGAIN) { tconn_close(ep, c); continue; }
                if (w > 0) c->poff += (size_t)w;
                if (c->poff == c->plen) {
                    free(c->pend); c->pend = NULL;
                    struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e2);
                }
                continue;
            }
            for (int rounds = 0; rounds < 4; rounds++) {
                ssize_t r = read(c->fd, buf, BUFSZ);
                if (r < 0) {
                    if (errno != EAGAIN && errno != EINTR) tconn_close(ep, c);
                    break;
                }
                if (r == 0) { /* EOF */
                    tconn_close(ep, c);
                    break;
                }
                if (c->mode == M_NEW) c->mode = buf[0] == 'S' ? M_SINK : M_ECHO;
                if (c->mode == M_SINK) { /* hand the stream to a thread of its own */
                    c->count += (unsigned long long)r;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    pthread_t t;
                    pthread_attr_t at;
                    pthread_attr_init(&at);
                    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
                    if (pthread_create(&t, &at, sink_thread, c) != 0) { close(c->fd); free(c); }
                    pthread_attr_destroy(&at);
                    break;
                }
                ssize_t w = write(c->fd, buf, (size_t)r);
                if (w < 0) {
                    if (errno != EAGAIN) { tconn_close(ep, c); break; }
                    w = 0;
                }
                if (w < r) { /* keep the rest, stop reading until it is written */
                    c->plen = (size_t)(r - w); c->poff = 0;
                    c->pend = malloc(c->plen);
                    memcpy(c->pend, buf + w, c->plen);
                    struct epoll_event e2 = {.events = EPOLLOUT, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e2);
                    break;
                }
                if (r < BUFSZ) break;
            }
        }
    }
    return NULL;
}

static int run_target(int threads) {
    g_lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(g_lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = dst_addr();
    if (bind(g_lfd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(g_lfd, 4096) < 0) die("listen");
    if (threads < 1) threads = 1;
    pthread_t t;
    for (int i = 1; i < threads; i++) pthread_create(&t, NULL, target_thread, NULL);
    target_thread(NULL);
    return 0;
}

/* ------------------------------------------------------------------ stream (throughput) */

typedef struct {
    unsigned long long bytes, got;
    double t_end;
    int ok;
    char err[96];
} stream_t;

static pthread_barrier_t g_barrier;
static double g_deadline, g_t0;

static void *stream_thread(void *arg) {
    stream_t *s = arg;
    char *buf = malloc(BUFSZ);
    memset(buf, 'x', BUFSZ);
    buf[0] = 'S';
    int fd = connect_blocking(g_deadline - now());
    if (fd < 0) snprintf(s->err, sizeof s->err, "connect: %s", strerror(errno));
    pthread_barrier_wait(&g_barrier); /* all connected (or failed): g_t0 is taken */
    if (fd < 0) return NULL;
    unsigned long long left = s->bytes;
    while (left) { /* only the very first byte is 'S' */
        size_t len = left < BUFSZ ? (size_t)left : BUFSZ;
        ssize_t w = write(fd, buf, len);
        if (w <= 0) {
            if (w < 0 && errno == EINTR) continue;
            snprintf(s->err, sizeof s->err, "write: %s", w < 0 ? strerror(errno) : "0");
            goto out;
        }
        left -= (unsigned long long)w;
        buf[0] = 'x';
        if (now() > g_deadline) { snprintf(s->err, sizeof s->err, "deadline"); goto out; }
    }
    shutdown(fd, SHUT_WR);
    char line[64];
    size_t got = 0;
    for (;;) {
        ssize_t r = read(fd, line + got, sizeof line - 1 - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) { if (r < 0) snprintf(s->err, sizeof s->err, "read count: %s", strerror(errno)); break; }
        got += (size_t)r;
        if (got == sizeof line - 1) break;
    }
    line[got] = 0;
    s->t_end = now();
    s->got = strtoull(line, NULL, 10);
    if (got && s->got == s->bytes) s->ok = 1;
    else if (!s->err[0]) snprintf(s->err, sizeof s->err, "sink counted %llu of %llu", s->got, s->bytes);
out:
    close(fd);
    free(buf);
    return NULL;
}

static int run_stream(unsigned long long bytes, int streams, double deadline) {
    signal(SIGPIPE, SIG_IGN);
    g_deadline = now() + deadline;
    stream_t *st = calloc((size_t)streams, sizeof *st);
    pthread_t *th = calloc((size_t)streams, sizeof *th);
    pthread_barrier_init(&g_barrier, NULL, (unsigned)streams + 1);
    for (int i = 0; i < streams; i++) {
        st[i].bytes = bytes / (unsigned long long)streams + (i < (int)(bytes % (unsigned long long)streams));
        pthread_create(&th[i], NULL, stream_thread, &st[i]);
    }
    double cpu0 = self_cpu();
    g_t0 = now();
    pthread_barrier_wait(&g_barrier);
    g_t0 = now();
    for (int i = 0; i < streams; i++) pthread_join(th[i], NULL);
    double t_end = g_t0, cpu = self_cpu() - cpu0;
    int ok = 1;
    unsigned long long total = 0;
    for (int i = 0; i < streams; i++) {
        if (!st[i].ok) ok = 0;
        else total += st[i].bytes;
        if (st[i].t_end > t_end) t_end = st[i].t_end;
    }
    double secs = t_end - g_t0;
    printf("{\"ok\":%s,\"streams\":%d,\"bytes\":%llu,\"seconds\":%.6f,\"mib_s\":%.1f,\"loadgen_cpu_s\":%.3f,\"errors\":[",
           ok ? "true" : "false", streams, total, secs, secs > 0 ? total / 1048576.0 / secs : 0, cpu);
    int first = 1;
    for (int i = 0; i < streams; i++)
        if (st[i].err[0]) { printf("%s\"stream %d: %s\"", first ? "" : ",", i, st[i].err); first = 0; }
    printf("]}\n");
    return ok ? 0 : 1;
}

/* ------------------------------------------------------------------ echo latency */

static int rtt1(int fd, char ch) {
    if (write(fd, &ch, 1) != 1) return -1;
    char r;
    ssize_t n;
    do n = read(fd, &r, 1); while (n < 0 && errno == EINTR);
    return n == 1 && r == ch ? 0 : -1;
}

static int run_echo(int n, double deadline) {
    double end = now() + deadline, cpu0 = self_cpu();
    int fd = connect_blocking(deadline);
    if (fd < 0) die("connect");
    samples_t s = {0};
    int fails = 0;
    for (int i = 0; i < 20 && !fails; i++) fails += rtt1(fd, 'w') < 0; /* warm-up: first byte sets up the relay */
    for (int i = 0; i < n && !fails && now() < end; i++) {
        double t = now();
        if (rtt1(fd, 'e') < 0) { fails++; break; }
        add_sample(&s, now() - t);
    }
    close(fd);
    printf("{\"ok\":%s,\"failures\":%d,\"loadgen_cpu_s\":%.3f,", !fails && (int)s.n == n ? "true" : "false", fails,
           self_cpu() - cpu0);
    print_stats("rtt", &s);
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------ sequential new connections */

static int run_connlat(int n, double deadline) {
    signal(SIGPIPE, SIG_IGN);
    double end = now() + deadline, t_start = now();
    samples_t s = {0};
    int fails = 0, consecutive = 0;
    char lasterr[96] = "";
    for (int i = 0; i < n && now() < end && consecutive < 20; i++) {
        double t = now(), left = end - t;
        int fd = connect_blocking(left < 5 ? left : 5);
        if (fd < 0 || rtt1(fd, 'c') < 0) {
            snprintf(lasterr, sizeof lasterr, "%s", fd < 0 ? strerror(errno) : "no echo");
            fails++; consecutive++;
        } else {
            add_sample(&s, now() - t);
            consecutive = 0;
        }
        if (fd >= 0) close(fd);
    }
    printf("{\"ok\":%s,\"failures\":%d,\"last_error\":\"%s\",\"seconds\":%.3f,", !fails && (int)s.n == n ? "true" : "false",
           fails, lasterr, now() - t_start);
    print_stats("lat", &s);
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------ event-driven connections */

enum { S_IDLE, S_CONNECTING, S_WAITING, S_DONE };
static char g_lasterr[96]; /* the last failure of the event-driven modes */
static long g_errkind[3];  /* connect failed, write failed, no echo (EOF/reset) */

static int fail(int kind, const char *what, int err) {
    g_errkind[kind]++;
    snprintf(g_lasterr, sizeof g_lasterr, "%s: %s", what, err ? strerror(err) : "EOF");
    return -1;
}
typedef struct { int fd, state; double t0; } slot_t;

static int slot_start(int ep, slot_t *sl, int idx) {
    sl->fd = client_socket(1);
    sl->t0 = now();
    if (sl->fd < 0) return fail(0, "socket", errno);
    struct sockaddr_in a = dst_addr();
    if (connect(sl->fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
        int e = errno;
        close(sl->fd); sl->fd = -1; return fail(0, "connect", e);
    }
    sl->state = S_CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, sl->fd, &ev) < 0) { close(sl->fd); sl->fd = -1; return -1; }
    return 0;
}

/* advances a slot on an event: returns 1 when its echo arrived, -1 on failure, 0 otherwise */
static int slot_event(int ep, slot_t *sl, int idx, uint32_t events) {
    if (sl->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(sl->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) return fail(0, "connect", err);
        char ch = 'p';
        if (write(sl->fd, &ch, 1) != 1) return fail(1, "write", errno);
        sl->state = S_WAITING;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)idx};
        epoll_ctl(ep, EPOLL_CTL_MOD, sl->fd, &ev);
        return 0;
    }
    if (sl->state == S_WAITING) {
        char ch;
        ssize_t r = read(sl->fd, &ch, 1);
        if (r < 0 && errno == EAGAIN && !(events & (EPOLLERR | EPOLLHUP))) return 0;
        if (r == 1 && ch == 'p') return 1;
        return fail(2, "read echo", r < 0 ? errno : 0);
    }
    return 0;
}

static void print_errors(void) {
    printf("\"connect_errors\":%ld,\"write_errors\":%ld,\"echo_errors\":%ld,\"last_error\":\"%s\",",
           g_errkind[0], g_errkind[1], g_errkind[2], g_lasterr);
}

static void slot_close(int ep, slot_t *sl) {
    if (sl->fd >= 0) { epoll_ctl(ep, EPOLL_CTL_DEL, sl->fd, NULL); close(sl->fd); }
    sl->fd = -1;
    sl->state = S_IDLE;
}

/* N connections, CONC at a time; each is done when its 1-byte echo is back */
static int run_conns(int n, int conc, double deadline, int hold) {
    signal(SIGPIPE, SIG_IGN);
    if (conc > n) conc = n;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    slot_t *sl = calloc((size_t)n, sizeof *sl);
    samples_t lat = {0};
    int started = 0, active = 0, ok = 0, fails = 0;
    double t0 = now(), end = t0 + deadline, last_done = t0;
    struct epoll_event evs[512];
    while (ok + fails < n) {
        while (active < conc && started < n) {
            if (slot_start(ep, &sl[started], started) < 0) { fails++; sl[started].state = S_DONE; }
            else active++;
            started++;
        }
        double t = now();
        if (t > end) break;
        int k = epoll_wait(ep, evs, 512, 50);
        for (int i = 0; i < k; i++) {
            int idx = (int)evs[i].data.u32;
            int r = slot_event(ep, &sl[idx], idx, evs[i].events);
            if (r == 0) continue;
            active--;
            if (r > 0) {
                ok++;
                last_done = now();
                add_sample(&lat, last_done - sl[idx].t0);
                if (hold) { epoll_ctl(ep, EPOLL_CTL_DEL, sl[idx].fd, NULL); sl[idx].state = S_DONE; }
                else slot_close(ep, &sl[idx]);
            } else {
                fails++;
                slot_close(ep, &sl[idx]);
                sl[idx].state = S_DONE;
            }
        }
    }
    for (int i = 0; i < started; i++) /* still pending at the deadline */
        if (sl[i].state == S_CONNECTING || sl[i].state == S_WAITING) slot_close(ep, &sl[i]);
    int timed_out = n - ok - fails;
    printf("{\"ok\":%s,\"n\":%d,\"succeeded\":%d,\"failed\":%d,\"timed_out\":%d,\"wall_s\":%.6f,",
           ok == n ? "true" : "false", n, ok, fails, timed_out, last_done - t0);
    print_errors();
    print_stats("lat", &lat);
    printf("}\n");
    fflush(stdout);
    if (hold) { /* keep the successful ones open until stdin is closed or a line arrives */
        char line[16];
        if (read(0, line, sizeof line) < 0) { /* ignore */ }
    }
    for (int i = 0; i < n; i++) if (sl[i].fd > 0) close(sl[i].fd);
    return 0;
}

/* sustained connections per second: CONC slots, each loops connect / echo / close */
static int run_cps(int conc, double seconds) {
    signal(SIGPIPE, SIG_IGN);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    slot_t *sl = calloc((size_t)conc, sizeof *sl);
    samples_t lat = {0};
    long done = 0, fails = 0, timeouts = 0;
    double cpu0 = self_cpu(), t0 = now(), end = t0 + seconds, per_conn_timeout = 5;
    for (int i = 0; i < conc; i++) if (slot_start(ep, &sl[i], i) < 0) { fails++; sl[i].state = S_IDLE; sl[i].fd = -1; }
    struct epoll_event evs[512];
    double last_scan = t0;
    for (;;) {
        double t = now();
        if (t >= end) break;
        int k = epoll_wait(ep, evs, 512, 20);
        for (int i = 0; i < k; i++) {
            int idx = (int)evs[i].data.u32;
            int r = slot_event(ep, &sl[idx], idx, evs[i].events);
            if (r == 0) continue;
            double tn = now();
            if (r > 0 && tn <= end) { done++; add_sample(&lat, tn - sl[idx].t0); }
            else if (r < 0) fails++;
            slot_close(ep, &sl[idx]);
            if (tn < end && slot_start(ep, &sl[idx], idx) < 0) { fails++; sl[idx].fd = -1; sl[idx].state = S_IDLE; }
        }
        t = now();
        if (t - last_scan > 0.1) { /* restart idle slots, time out stuck ones */
            last_scan = t;
            for (int i = 0; i < conc && t < end; i++) {
                if (sl[i].state != S_IDLE && t - sl[i].t0 > per_conn_timeout) { timeouts++; slot_close(ep, &sl[i]); }
                if (sl[i].state == S_IDLE && slot_start(ep, &sl[i], i) < 0) { fails++; sl[i].fd = -1; sl[i].state = S_IDLE; }
            }
        }
    }
    double elapsed = now() - t0;
    for (int i = 0; i < conc; i++) slot_close(ep, &sl[i]);
    printf("{\"ok\":%s,\"completed\":%ld,\"failed\":%ld,\"timed_out\":%ld,\"seconds\":%.3f,\"cps\":%.1f,"
           "\"loadgen_cpu_s\":%.3f,",
           fails || timeouts ? "false" : "true", done, fails, timeouts, elapsed, done / seconds, self_cpu() - cpu0);
    print_errors();
    print_stats("lat", &lat);
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: npbench target|stream|echo|connlat|conns|cps PORT ... (see source)\n");
        return 64;
    }
    const char *env = getenv("NPB_SRC_IPS");
    if (env) g_src_ips = atoi(env);
    if (g_src_ips > 250) g_src_ips = 250;
    const char *mode = argv[1];
    g_port = atoi(argv[2]);
#define NEED(k) do { if (argc < (k)) { fprintf(stderr, "npbench %s: missing arguments\n", mode); return 64; } } while (0)
    if (!strcmp(mode, "target")) { NEED(4); return run_target(atoi(argv[3])); }
    if (!strcmp(mode, "stream")) { NEED(6); return run_stream(strtoull(argv[3], NULL, 10), atoi(argv[4]), atof(argv[5])); }
    if (!strcmp(mode, "echo")) { NEED(5); return run_echo(atoi(argv[3]), atof(argv[4])); }
    if (!strcmp(mode, "connlat")) { NEED(5); return run_connlat(atoi(argv[3]), atof(argv[4])); }
    if (!strcmp(mode, "conns")) { NEED(7); return run_conns(atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atoi(argv[6])); }
    if (!strcmp(mode, "cps")) { NEED(5); return run_cps(atoi(argv[3]), atof(argv[4])); }
    fprintf(stderr, "npbench: unknown mode %s\n", mode);
    return 64;
}
