// UDP load generator and target for bench/udpbench.py (Linux; built with gcc at run time).
//
//   udpbench echo PORT                          echo every datagram to its sender (recvmmsg/sendmmsg)
//   udpbench rate PORT SIZE PPS SECONDS FLOWS   send SIZE-byte datagrams at PPS for SECONDS from FLOWS
//                                               sockets; prints "sent N received M"
//   udpbench rr PORT SIZE COUNT                 COUNT request/reply round trips of one flow; prints
//                                               "p50 US p99 US lost N" (a reply missing after 1 s is lost)
//   udpbench hold PORT FLOWS SECONDS            FLOWS flows each send one datagram and get its reply, then
//                                               stay open SECONDS; prints "answered N" once all are
//   udpbench relay-back TCPPORT TARGETPORT      the floor of a tunnel's UDP path, one flow: user --UDP-->
//   udpbench relay-front UDPPORT TCPPORT        front --TCP, 2-byte length per datagram--> back --UDP-->
//                                               target and back, with poll and one system call per step
//                                               (start back first; both run until their TCP connection
//                                               ends or they are stopped). See docs/PERFORMANCE.md.
//
// All on 127.0.0.1. Every other loop is bounded by a count or a deadline.
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXDGRAM 65536

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int udp_socket(int bufsize) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0) { perror("socket"); exit(1); }
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufsize, sizeof bufsize);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufsize, sizeof bufsize);
    return fd;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int connected(int port, int bufsize) {
    int fd = udp_socket(bufsize);
    struct sockaddr_in a = loopback(port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); exit(1); }
    return fd;
}

static int run_echo(int port) {
    int fd = udp_socket(8 << 20);
    struct sockaddr_in a = loopback(port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    static char bufs[BATCH][MAXDGRAM];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in from[BATCH];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        struct pollfd p = {fd, POLLIN, 0};
        poll(&p, 1, 1000);
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = MAXDGRAM;
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) continue;
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        int sent = 0;
        for (int tries = 0; sent < n && tries < 100; tries++) {
            int r = sendmmsg(fd, msgs + sent, n - sent, 0);
            if (r > 0) sent += r;
        }
    }
}

static long drain(int fd, char *buf) {
    long got = 0;
    for (int i = 0; i < 4096; i++) {
        ssize_t r = recv(fd, buf, MAXDGRAM, MSG_DONTWAIT);
        if (r < 0) break;
        got++;
    }
    return got;
}

static int run_rate(int port, int size, double pps, double seconds, int flows) {
    int *fds = calloc(flows, sizeof *fds);
    for (int i = 0; i < flows; i++) fds[i] = connected(port, 4 << 20);
    static char buf[MAXDGRAM];
    memset(buf, 0x5a, sizeof buf);
    long sent = 0, received = 0;
    double start = now(), end = start + seconds;
    int next = 0;
    while (now() < end) {
        long due = (long)((now() - start) * pps);
        for (int burst = 0; sent < due && burst < BATCH; burst++) {
            // A datagram the kernel refuses (a full buffer) counts as sent and lost.
            (void)send(fds[next], buf, size, MSG_DONTWAIT);
            sent++;
            next = (next + 1) % flows;
        }
        for (int i = 0; i < flows; i++) received += drain(fds[i], buf);
    }
    double tail = now() + 1.0;
    while (now() < tail) {
        struct pollfd p[64];
        int n = flows < 64 ? flows : 64;
        for (int i = 0; i < n; i++) { p[i].fd = fds[i]; p[i].events = POLLIN; }
        poll(p, n, 50);
        for (int i = 0; i < flows; i++) received += drain(fds[i], buf);
    }
    printf("sent %ld received %ld\n", sent, received);
    return 0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int run_rr(int port, int size, int count) {
    int fd = connected(port, 1 << 20);
    static char buf[MAXDGRAM], in[MAXDGRAM];
    double *rtt = calloc(count, sizeof *rtt);
    int done = 0, lost = 0;
    for (int i = 0; i < count; i++) {
        memcpy(buf, &i, sizeof i);
        double t0 = now();
        send(fd, buf, size, 0);
        for (;;) {
            struct pollfd p = {fd, POLLIN, 0};
            if (poll(&p, 1, 1000) <= 0) { lost++; break; }
            ssize_t r = recv(fd, in, MAXDGRAM, MSG_DONTWAIT);
            if (r >= (ssize_t)sizeof i && !memcmp(in, &i, sizeof i)) { rtt[done++] = (now() - t0) * 1e6; break; }
        }
    }
    qsort(rtt, done, sizeof *rtt, cmp);
    printf("p50 %.1f p99 %.1f lost %d\n", done ? rtt[done / 2] : -1.0, done ? rtt[done * 99 / 100] : -1.0, lost);
    return 0;
}

static int run_hold(int port, int flows, double seconds) {
    int *fds = calloc(flows, sizeof *fds);
    static char buf[MAXDGRAM];
    for (int i = 0; i < flows; i++) {
        fds[i] = connected(port, 65536);
        send(fds[i], "hold", 4, 0);
    }
    int answered = 0;
    char *seen = calloc(flows, 1);
    double deadline = now() + 20, resend = now() + 0.25;
    while (answered < flows && now() < deadline) {
        for (int i = 0; i < flows; i++) {
            if (!seen[i] && recv(fds[i], buf, MAXDGRAM, MSG_DONTWAIT) >= 0) { seen[i] = 1; answered++; }
        }
        // A relay that forks per flow (socat) may miss a flow's first datagram: ask again.
        if (now() > resend) {
            for (int i = 0; i < flows; i++) if (!seen[i]) send(fds[i], "hold", 4, MSG_DONTWAIT);
            resend = now() + 0.25;
        }
        usleep(1000);
    }
    printf("answered %d\n", answered);
    fflush(stdout);
    usleep((useconds_t)(seconds * 1e6));
    return 0;
}


// The relays of the floor chain: one flow, frames of a 2-byte length and the datagram over TCP.
static int read_exactly(int fd, unsigned char *buf, int n) {
    for (int got = 0; got < n;) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) return -1;
        got += (int)r;
    }
    return n;
}

// One frame from the TCP side into buf; its length, or -1 when the connection ended.
static int read_frame(int tcp, unsigned char *buf) {
    unsigned char header[2];
    if (read_exactly(tcp, header, 2) < 0) return -1;
    int n = header[0] << 8 | header[1];
    return read_exactly(tcp, buf, n) < 0 ? -1 : n;
}

static void write_frame(int tcp, unsigned char *frame, ssize_t n) {
    if (n < 0) return;
    frame[0] = (unsigned char)(n >> 8);
    frame[1] = (unsigned char)n;
    if (write(tcp, frame, n + 2) != n + 2) exit(1);
}

static int run_relay_front(int udp_port, int tcp_port) {
    static unsigned char buf[MAXDGRAM + 2];
    int one = 1, tcp = -1;
    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in self = loopback(udp_port), back = loopback(tcp_port), user;
    socklen_t length = sizeof user;
    if (bind(udp, (void *)&self, sizeof self)) { perror("bind"); return 1; }
    for (int tries = 0;; tries++) {
        tcp = socket(AF_INET, SOCK_STREAM, 0);
        if (!connect(tcp, (void *)&back, sizeof back)) break;
        close(tcp);
        if (tries == 100) { perror("connect"); return 1; }
        usleep(100000);
    }
    setsockopt(tcp, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    for (;;) {
        struct pollfd p[2] = {{udp, POLLIN, 0}, {tcp, POLLIN, 0}};
        poll(p, 2, -1);
        if (p[0].revents) {
            length = sizeof user;
            write_frame(tcp, buf, recvfrom(udp, buf + 2, MAXDGRAM - 1, 0, (void *)&user, &length));
        }
        if (p[1].revents) {
            int n = read_frame(tcp, buf);
            if (n < 0) return 0;
            sendto(udp, buf, n, 0, (void *)&user, sizeof user);
        }
    }
}

static int run_relay_back(int tcp_port, int target_port) {
    static unsigned char buf[MAXDGRAM + 2];
    int one = 1;
    int udp = socket(AF_INET, SOCK_DGRAM, 0), listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in self = loopback(tcp_port), target = loopback(target_port);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (void *)&self, sizeof self) || listen(listener, 1)) { perror("listen"); return 1; }
    int tcp = accept(listener, NULL, NULL);
    setsockopt(tcp, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    connect(udp, (void *)&target, sizeof target);
    for (;;) {
        struct pollfd p[2] = {{udp, POLLIN, 0}, {tcp, POLLIN, 0}};
        poll(p, 2, -1);
        if (p[1].revents) {
            int n = read_frame(tcp, buf);
            if (n < 0) return 0;
            send(udp, buf, n, 0);
        }
        if (p[0].revents) write_frame(tcp, buf, recv(udp, buf + 2, MAXDGRAM - 1, 0));
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: udpbench echo|rate|rr|hold|relay-front|relay-back PORT ... (see source)\n");
        return 2;
    }
    const char *mode = argv[1];
    int port = atoi(argv[2]);
    if (!strcmp(mode, "echo")) return run_echo(port);
    if (!strcmp(mode, "rate") && argc == 7)
        return run_rate(port, atoi(argv[3]), atof(argv[4]), atof(argv[5]), atoi(argv[6]));
    if (!strcmp(mode, "rr") && argc == 5) return run_rr(port, atoi(argv[3]), atoi(argv[4]));
    if (!strcmp(mode, "hold") && argc == 5) return run_hold(port, atoi(argv[3]), atof(argv[4]));
    if (!strcmp(mode, "relay-front") && argc == 4) return run_relay_front(port, atoi(argv[3]));
    if (!strcmp(mode, "relay-back") && argc == 4) return run_relay_back(port, atoi(argv[3]));
    fprintf(stderr, "udpbench: bad arguments\n");
    return 2;
}
