import NIOCore
import NodePassCore

/// What a control channel's decoder passes on: a v1 line (`SignalLineDecoder`) or a v2 frame
/// (`V2FrameDecoder`).
enum ControlInput: Hashable, Sendable {
    /// A v1 line.
    case line(SignalLineDecoder.Line)
    /// A v2 frame.
    case frame(V2Frame)
}

/// A decoder of a control channel: what is left at the end of input is decoded as far as it goes, and
/// an incomplete rest is dropped.
protocol ControlDecoder: ByteToMessageDecoder where InboundOut == ControlInput {}

extension ControlDecoder {
    mutating func decodeLast(
        context: ChannelHandlerContext,
        buffer: inout ByteBuffer,
        seenEOF: Bool
    ) throws -> DecodingState {
        while try self.decode(context: context, buffer: &buffer) == .continue {}
        buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
        return .needMoreData
    }
}
