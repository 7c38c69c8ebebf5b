import NIOCore
import NodePassCore

/// Splits the v2 control channel into frames; a frame announcing more than
/// `V2Frame.maximumPayloadLength` bytes is an error before any of it is buffered.
struct V2FrameDecoder: ControlDecoder {
    typealias InboundOut = ControlInput

    /// Makes a decoder.
    init() {}

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        switch try V2Frame.read(from: &buffer) {
        case .frame(let frame):
            context.fireChannelRead(NIOAny(ControlInput.frame(frame)))
            return .continue
        case .needMoreData:
            return .needMoreData
        }
    }
}
