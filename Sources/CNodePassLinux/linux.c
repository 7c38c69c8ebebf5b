#define _GNU_SOURCE
#include "CNodePassLinux.h"

#include <errno.h>

#ifdef __linux__
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

int np_pipe(int fds[2]) { return pipe2(fds, O_NONBLOCK | O_CLOEXEC); }

int np_pipe_set_size(int fd, int size) { return fcntl(fd, F_SETPIPE_SZ, size); }

ssize_t np_splice(int from, int to, size_t length) {
    ssize_t moved = splice(from, NULL, to, NULL, length, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    return moved < 0 ? -errno : moved;
}

ssize_t np_send(int fd, const void *bytes, size_t length) {
    ssize_t written = send(fd, bytes, length, MSG_NOSIGNAL | MSG_DONTWAIT);
    return written < 0 ? -errno : written;
}

int np_socket_error(int fd) {
    int error = 0;
    socklen_t size = sizeof error;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) != 0) return errno;
    return error;
}

int np_shutdown_write(int fd) { return shutdown(fd, SHUT_WR); }

int np_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

static int add(int epoll, int fd, uint32_t events, uint64_t token) {
    struct epoll_event event = {0};
    event.events = events;
    event.data.u64 = token;
    return epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event);
}

int np_epoll_add(int epoll, int fd, uint64_t token) {
    return add(epoll, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, token);
}

int np_epoll_add_readable(int epoll, int fd, uint64_t token) { return add(epoll, fd, EPOLLIN, token); }

int np_epoll_remove(int epoll, int fd) {
    struct epoll_event unused = {0};
    return epoll_ctl(epoll, EPOLL_CTL_DEL, fd, &unused);
}

int np_epoll_wait(int epoll, uint64_t *tokens, uint32_t *flags, int capacity, int timeout_ms) {
    struct epoll_event events[256];
    if (capacity > 256) capacity = 256;
    int count = epoll_wait(epoll, events, capacity, timeout_ms);
    for (int i = 0; i < count; i++) {
        uint32_t bits = 0;
        if (events[i].events & (EPOLLIN | EPOLLPRI)) bits |= NP_READABLE;
        if (events[i].events & EPOLLOUT) bits |= NP_WRITABLE;
        if (events[i].events & EPOLLRDHUP) bits |= NP_HANGUP;
        if (events[i].events & (EPOLLHUP | EPOLLERR)) bits |= NP_ERROR;
        tokens[i] = events[i].data.u64;
        flags[i] = bits;
    }
    return count;
}

int np_eventfd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

int np_eventfd_signal(int fd) {
    uint64_t one = 1;
    return write(fd, &one, sizeof one) == sizeof one ? 0 : -1;
}

void np_eventfd_drain(int fd) {
    uint64_t value;
    while (read(fd, &value, sizeof value) > 0) {
    }
}

#else

#define UNSUPPORTED { errno = ENOSYS; return -1; }
int np_pipe(int fds[2]) UNSUPPORTED
int np_pipe_set_size(int fd, int size) UNSUPPORTED
ssize_t np_splice(int from, int to, size_t length) { return -ENOSYS; }
ssize_t np_send(int fd, const void *bytes, size_t length) { return -ENOSYS; }
int np_socket_error(int fd) { return ENOSYS; }
int np_shutdown_write(int fd) UNSUPPORTED
int np_epoll_create(void) UNSUPPORTED
int np_epoll_add(int epoll, int fd, uint64_t token) UNSUPPORTED
int np_epoll_add_readable(int epoll, int fd, uint64_t token) UNSUPPORTED
int np_epoll_remove(int epoll, int fd) UNSUPPORTED
int np_epoll_wait(int epoll, uint64_t *tokens, uint32_t *flags, int capacity, int timeout_ms) UNSUPPORTED
int np_eventfd(void) UNSUPPORTED
int np_eventfd_signal(int fd) UNSUPPORTED
void np_eventfd_drain(int fd) {}

#endif
