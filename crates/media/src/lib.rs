//! weft-media: turning untrusted media references into decoded frames. Every byte is hostile:
//! sizes are capped before decoding, addresses are checked before connecting, and every
//! refusal says which limit or rule it hit.

pub mod addr;
pub mod budget;
pub mod data_uri;
pub mod fetch;
pub mod image_decode;
pub mod jpeg;
pub mod video;
