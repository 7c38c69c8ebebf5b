# Build: the same build as CI (warnings are errors), release, static Swift standard library.
FROM swift:6.1-bookworm AS build
WORKDIR /src
COPY Package.swift ./
RUN swift package resolve
COPY Sources ./Sources
COPY Tests ./Tests
RUN swift build -c release --static-swift-stdlib -Xswiftc -warnings-as-errors \
    && install -D -m 755 "$(swift build -c release --show-bin-path)/nodepass" /out/nodepass

# Run: a slim image, the binary and a non-root user.
FROM debian:bookworm-slim
RUN useradd --system --no-create-home --shell /usr/sbin/nologin nodepass
COPY --from=build /out/nodepass /usr/local/bin/nodepass
USER nodepass
ENTRYPOINT ["/usr/local/bin/nodepass"]
CMD ["--help"]
