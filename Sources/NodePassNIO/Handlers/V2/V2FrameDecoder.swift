import NIOCore
import NodePassCore

/// Splits the v2 control channel into frames; a frame announcing more than
/// `V2Frame.maximumPayloadLength` bytes is an error before any of it is buffered.
public struct V2FrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = V2Frame

    /// Makes a decoder.
    public init() {}

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        switch try V2Frame.read(from: &buffer) {
        case .frame(let frame):
            context.fireChannelRead(NIOAny(frame))
            return .continue
        case .needMoreData:
            return .needMoreData
        }
    }

    public mutating func decodeLast(
        context: ChannelHandlerContext,
        buffer: inout ByteBuffer,
        seenEOF: Bool
    ) throws -> DecodingState {
        while try self.decode(context: context, buffer: &buffer) == .continue {}
        buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
        return .needMoreData
    }
}
