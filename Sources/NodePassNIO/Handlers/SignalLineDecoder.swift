import NIOCore
import NodePassCore

/// Splits the control channel into lines at `\n`, without the terminator.
///
/// A line longer than `maximumLineLength` is not buffered: its bytes are dropped up to the next `\n` and
/// a single `.overlong` is emitted, so a hostile peer cannot grow the buffer and the stream stays in sync.
struct SignalLineDecoder: ControlDecoder {
    /// One decoded unit.
    enum Line: Hashable, Sendable {
        /// A complete line.
        case line(ByteBuffer)
        /// A line that was too long and was dropped.
        case overlong
    }

    typealias InboundOut = ControlInput

    private let maximumLineLength: Int
    private var discarding = false

    /// Makes a decoder accepting lines of at most `maximumLineLength` bytes.
    init(maximumLineLength: Int = Signal.maximumLineLength) {
        self.maximumLineLength = maximumLineLength
    }

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        let view = buffer.readableBytesView
        guard let newline = view.firstIndex(of: UInt8(ascii: "\n")) else {
            if buffer.readableBytes > self.maximumLineLength {
                if !self.discarding {
                    self.discarding = true
                    context.fireChannelRead(NIOAny(ControlInput.line(.overlong)))
                }
                buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
            }
            return .needMoreData
        }
        let length = newline - view.startIndex
        let line = buffer.readSlice(length: length) ?? ByteBuffer()
        buffer.moveReaderIndex(forwardBy: 1)
        if self.discarding {
            self.discarding = false
        } else if length > self.maximumLineLength {
            context.fireChannelRead(NIOAny(ControlInput.line(.overlong)))
        } else {
            context.fireChannelRead(NIOAny(ControlInput.line(.line(line))))
        }
        return .continue
    }
}
