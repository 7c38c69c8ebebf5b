// Thin wrappers over the Linux calls the splice relay needs and Swift's Glibc module does not export
// (pipe2, splice, F_SETPIPE_SZ, epoll, eventfd). Elsewhere every function reports ENOSYS.
#ifndef C_NODEPASS_LINUX_H
#define C_NODEPASS_LINUX_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// Readiness bits reported by np_epoll_wait.
enum {
    NP_READABLE = 1,
    NP_WRITABLE = 2,
    /// The peer ended its output (EPOLLRDHUP).
    NP_HANGUP = 4,
    /// An error or a hang-up of both directions (EPOLLERR, EPOLLHUP): see np_socket_error.
    NP_ERROR = 8,
};

/// Creates a non-blocking, close-on-exec pipe; fds[0] reads, fds[1] writes. Returns 0 or -1 (errno set).
int np_pipe(int fds[2]);
/// Asks for a pipe capacity of `size` bytes; returns the capacity granted, or -1.
int np_pipe_set_size(int fd, int size);
/// Moves up to `length` bytes from `from` to `to` without copying through user space, never blocking.
/// Returns the bytes moved, 0 at the end of input, or -errno.
ssize_t np_splice(int from, int to, size_t length);
/// Writes without raising SIGPIPE, never blocking. Returns the bytes written or -errno.
ssize_t np_send(int fd, const void *bytes, size_t length);
/// The socket's pending error (SO_ERROR, cleared by reading it), 0 if none.
int np_socket_error(int fd);
/// Closes the write direction of a socket.
int np_shutdown_write(int fd);

/// An epoll instance (close-on-exec).
int np_epoll_create(void);
/// Watches `fd`, edge-triggered, for reading, writing and hang-up; events carry `token`.
int np_epoll_add(int epoll, int fd, uint64_t token);
/// Watches `fd`, level-triggered, for reading only; events carry `token`.
int np_epoll_add_readable(int epoll, int fd, uint64_t token);
int np_epoll_remove(int epoll, int fd);
/// Waits up to `timeout_ms` (-1: forever) for at most `capacity` events; fills tokens and NP_* bits.
int np_epoll_wait(int epoll, uint64_t *tokens, uint32_t *flags, int capacity, int timeout_ms);

/// A non-blocking, close-on-exec eventfd.
int np_eventfd(void);
int np_eventfd_signal(int fd);
void np_eventfd_drain(int fd);

#endif
