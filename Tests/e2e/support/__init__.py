"""Helpers for the NodePass end-to-end tests, one module per concern (each test imports from the module
that owns what it needs):

- waiting: wait_for, WaitTimeout, ProcessDied
- ports: free_port, family_of, ipv6_loopback_available, url_host
- sockets: connect, recv_exact, recv_all
- procfs: TcpSocket, tcp_sockets, is_listening, TCP_ESTABLISHED, TCP_LISTEN (sockets read from /proc)
- processes: Proc, ProcessManager, Service
- probes: echo_probe, redis_probe, http_probe
- tunnel: Tunnel, DEFAULT_ENV, SHUTDOWN_TIMEOUT_S
- data: MiB, PatternStream
- go_original: register_go_binary, is_go_binary

No fixed sleeps are used for synchronisation: every wait polls for an event
(a listening socket, an established connection, a successful round trip)
under an explicit deadline with a short, growing backoff.
"""
