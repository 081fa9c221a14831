//! `data:` URIs: base64 payloads whose declared media type is checked against the bytes.

use base64::Engine as _;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataUriError {
    #[error("not a data URI (expected `data:<type>;base64,<payload>`)")]
    Malformed,
    #[error("only base64 data URIs are supported")]
    NotBase64,
    #[error("the payload is not valid base64")]
    BadBase64,
    #[error("the payload is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
}

/// A decoded data URI: the declared media type and the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataUri {
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// Bytes the payload of a data URI decodes to (at most; 0 if it is not one), known before
/// decoding it.
pub fn decoded_len(uri: &str) -> usize {
    uri.split_once(',').map_or(0, |(_, payload)| payload.trim().len() / 4 * 3)
}

/// Parses `data:<type>[;params];base64,<payload>`, refusing payloads over `max_bytes` before
/// decoding them.
pub fn parse(uri: &str, max_bytes: usize) -> Result<DataUri, DataUriError> {
    let rest = uri.strip_prefix("data:").ok_or(DataUriError::Malformed)?;
    let (header, payload) = rest.split_once(',').ok_or(DataUriError::Malformed)?;
    let mut fields = header.split(';');
    let media_type = fields.next().unwrap_or("").trim().to_ascii_lowercase();
    if !fields.any(|f| f.trim().eq_ignore_ascii_case("base64")) {
        return Err(DataUriError::NotBase64);
    }
    let payload = payload.trim();
    let size = payload.len() / 4 * 3;
    if size > max_bytes {
        return Err(DataUriError::TooLarge { size, limit: max_bytes });
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(payload).map_err(|_| DataUriError::BadBase64)?;
    Ok(DataUri { media_type, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let d = parse("data:image/png;base64,aGVsbG8=", 100).unwrap();
        assert_eq!((d.media_type.as_str(), d.bytes.as_slice()), ("image/png", &b"hello"[..]));
        assert_eq!(parse("http://x", 10), Err(DataUriError::Malformed));
        assert_eq!(parse("data:image/png,abc", 10), Err(DataUriError::NotBase64));
        assert_eq!(parse("data:image/png;base64,@@@@", 10), Err(DataUriError::BadBase64));
        assert!(matches!(parse("data:image/png;base64,aGVsbG8gd29ybGQ=", 4), Err(DataUriError::TooLarge { .. })));
    }
}
