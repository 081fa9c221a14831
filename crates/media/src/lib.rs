//! weft-media: turning media references into decoded frames. For now: data URIs, image decoding
//! with header-checked limits, content hashes, and GIF frame sampling; remote fetching and
//! FFmpeg video arrive with the media issue.

pub mod data_uri;
pub mod image_decode;
pub mod video;
