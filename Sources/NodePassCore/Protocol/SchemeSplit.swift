/// Splits `scheme://rest` at the first `://`; nil when there is none.
func splitScheme<S: StringProtocol>(_ text: S) -> (scheme: S.SubSequence, rest: S.SubSequence)? {
    var index = text.startIndex
    while index < text.endIndex {
        if text[index] == ":" && text[index...].hasPrefix("://") {
            let restStart = text.index(index, offsetBy: 3)
            return (text[..<index], text[restStart...])
        }
        index = text.index(after: index)
    }
    return nil
}
