// Floods a v2 server's pool port with openings that carry a wrong proof, as fast as the server takes them.
//
//     pool_flood HOST PORT SECONDS [IN_FLIGHT]
//
// Keeps IN_FLIGHT (default 256) openings going at once, each from one of 32 loopback source addresses
// (127.0.0.2 to 127.0.0.33) so that no address runs out of ports: connect, send 48 bytes that match no
// session (an ID and a proof), read until the server closes. Prints "ready" when it starts and, at the end,
// "refused N" with the openings the server answered with its 32-byte nonce and then closed.

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { MAX_IN_FLIGHT = 4096, NONCE = 32, MESSAGE = 48 };

struct opening {
    int fd;
    int received;
    int sent;
};

static struct opening openings[MAX_IN_FLIGHT];
static struct sockaddr_in target;
static int epoll_fd;
static unsigned source;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

// Starts opening `slot`; returns 0 when a socket is on its way.
static int start(int slot) {
    struct opening *o = &openings[slot];
    o->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    o->received = 0;
    o->sent = 0;
    if (o->fd < 0) return -1;
    struct sockaddr_in from = {.sin_family = AF_INET};
    from.sin_addr.s_addr = htonl(0x7f000002u + (source++ % 32));
    if (bind(o->fd, (struct sockaddr *)&from, sizeof from) != 0 ||
        (connect(o->fd, (struct sockaddr *)&target, sizeof target) != 0 && errno != EINPROGRESS)) {
        close(o->fd);
        o->fd = -1;
        return -1;
    }
    struct epoll_event event = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u32 = (unsigned)slot};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, o->fd, &event) != 0) {
        close(o->fd);
        o->fd = -1;
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s HOST PORT SECONDS [IN_FLIGHT]\n", argv[0]);
        return 2;
    }
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1) {
        fprintf(stderr, "not an IPv4 address: %s\n", argv[1]);
        return 2;
    }
    double seconds = atof(argv[3]);
    int in_flight = argc > 4 ? atoi(argv[4]) : 256;
    if (in_flight < 1 || in_flight > MAX_IN_FLIGHT) in_flight = 256;
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd < 0) {
        perror("epoll_create1");
        return 1;
    }
    unsigned char message[MESSAGE];
    for (int i = 0; i < MESSAGE; i++) message[i] = (unsigned char)(i * 37 + 11);
    for (int slot = 0; slot < in_flight; slot++) start(slot);
    printf("ready\n");
    fflush(stdout);
    long refused = 0;
    double deadline = now() + seconds;
    struct epoll_event events[256];
    while (now() < deadline) {
        int count = epoll_wait(epoll_fd, events, 256, 100);
        for (int i = 0; i < count; i++) {
            int slot = (int)events[i].data.u32;
            struct opening *o = &openings[slot];
            if (o->fd < 0) continue;
            int done = 0;
            if ((events[i].events & EPOLLOUT) && !o->sent) {
                o->sent = 1;
                if (send(o->fd, message, MESSAGE, MSG_NOSIGNAL) != MESSAGE) done = 1;
                struct epoll_event event = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (unsigned)slot};
                epoll_ctl(epoll_fd, EPOLL_CTL_MOD, o->fd, &event);
            }
            if (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                char buffer[256];
                for (;;) {
                    ssize_t n = recv(o->fd, buffer, sizeof buffer, 0);
                    if (n > 0) {
                        o->received += (int)n;
                        continue;
                    }
                    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) done = 1;
                    break;
                }
            }
            if (done) {
                if (o->received == NONCE) refused++;
                close(o->fd);
                o->fd = -1;
            }
        }
        for (int slot = 0; slot < in_flight; slot++) {
            if (openings[slot].fd < 0) start(slot);
        }
    }
    printf("refused %ld\n", refused);
    fflush(stdout);
    return 0;
}
